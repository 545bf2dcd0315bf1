"""The canonical catalog model: one Arrow schema for products, queries and judgments, plus the
grade scale of each dataset (ordered labels, their NDCG gains, and the stage-1 positive threshold).

Every loader converts its source format into these schemas; everything downstream (training,
evaluation, indexing, serving) reads only these.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1

PRODUCT_SCHEMA = pa.schema(
    [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("description", pa.string()),
        pa.field("brand", pa.string()),
        pa.field("category", pa.string()),  # path, "Home > Kitchen > Kettles"
        pa.field("attributes", pa.map_(pa.string(), pa.string())),
        pa.field("price", pa.float64()),
        pa.field("in_stock", pa.bool_()),  # null: the source does not say (taken as in stock)
        pa.field("variant_group", pa.string()),  # family id given by the source, if any
    ]
)

QUERY_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
    ]
)

JUDGMENT_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("grade", pa.float64(), nullable=False),
        pa.field("label", pa.string()),  # the source's own label ("E", "Exact"), if any
    ]
)

# What prepare_catalog adds: the text the encoder sees, the resolved variant group, the split.
PREPARED_PRODUCT_SCHEMA = (
    PRODUCT_SCHEMA.set(
        PRODUCT_SCHEMA.get_field_index("variant_group"),
        pa.field("variant_group", pa.string(), nullable=False),
    )
    .append(pa.field("text", pa.string(), nullable=False))
)
PREPARED_QUERY_SCHEMA = QUERY_SCHEMA.append(pa.field("split", pa.string(), nullable=False))
PREPARED_JUDGMENT_SCHEMA = JUDGMENT_SCHEMA.append(pa.field("split", pa.string(), nullable=False))

# A row that failed validation, kept with its reason: nothing read is ever dropped silently.
REJECT_SCHEMA = pa.schema(
    [
        pa.field("table", pa.string(), nullable=False),  # products | queries | judgments
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("record", pa.int64(), nullable=False),  # 1-based data record in that file
        pa.field("reason", pa.string(), nullable=False),
        pa.field("raw", pa.string(), nullable=False),  # the raw record as JSON
    ]
)

SCHEMAS = {"products": PRODUCT_SCHEMA, "queries": QUERY_SCHEMA, "judgments": JUDGMENT_SCHEMA}
PREPARED_SCHEMAS = {
    "products": PREPARED_PRODUCT_SCHEMA,
    "queries": PREPARED_QUERY_SCHEMA,
    "judgments": PREPARED_JUDGMENT_SCHEMA,
}


@dataclass(frozen=True)
class GradeLevel:
    label: str
    grade: float
    gain: float


@dataclass(frozen=True)
class GradeScale:
    """How a dataset grades relevance.

    Either ordered labels (``levels``, best first) or a numeric range (``numeric_range``, e.g. Home
    Depot's mean rating 1–3, gain = (r − r_min)/(r_max − r_min), METHOD.md "Metrics").
    """

    name: str
    levels: tuple[GradeLevel, ...] = ()
    numeric_range: tuple[float, float] | None = None
    positive_threshold: float = 0.0  # grade >= this is a stage-1 positive (substitute-or-better)
    top_threshold: float = 0.0  # grade >= this is "top grade" for Recall@k and MRR@k
    unlabelled_is_irrelevant: bool = False  # may mined negatives be graded as the lowest grade?
    gain_map_name: str = ""

    def __post_init__(self) -> None:
        if bool(self.levels) == (self.numeric_range is not None):
            raise ValueError(f"grade scale {self.name}: give either levels or numeric_range")
        if self.levels:
            grades = [lv.grade for lv in self.levels]
            if grades != sorted(grades, reverse=True) or len(set(grades)) != len(grades):
                raise ValueError(f"grade scale {self.name}: levels must be best first, distinct")

    @property
    def min_grade(self) -> float:
        return self.numeric_range[0] if self.numeric_range else self.levels[-1].grade

    @property
    def max_grade(self) -> float:
        return self.numeric_range[1] if self.numeric_range else self.levels[0].grade

    def grade_of_label(self, label: str) -> float | None:
        """The grade of a source label (case-insensitive), or None if the label is unknown."""
        key = label.strip().lower()
        for lv in self.levels:
            if lv.label.lower() == key:
                return lv.grade
        return None

    def parse(self, raw: str) -> tuple[float, str | None]:
        """A raw grade field (a label, or a number on the numeric range) -> (grade, label).

        Raises ValueError with a message fit for a reject reason.
        """
        text = raw.strip()
        if self.levels:
            grade = self.grade_of_label(text)
            if grade is not None:
                return grade, text
            try:
                value = float(text)
            except ValueError:
                known = ", ".join(lv.label for lv in self.levels)
                raise ValueError(f"unknown label {text!r} (known: {known})") from None
            if value in {lv.grade for lv in self.levels}:
                return value, next(lv.label for lv in self.levels if lv.grade == value)
            raise ValueError(f"grade {value} is not a level of {self.name}")
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"grade {text!r} is not a number") from None
        lo, hi = self.numeric_range  # type: ignore[misc]
        if not (math.isfinite(value) and lo <= value <= hi):
            raise ValueError(f"grade {value} outside [{lo}, {hi}]")
        return value, None

    def gain(self, grades: np.ndarray | float) -> np.ndarray:
        """NDCG gain of grades (METHOD.md "Metrics")."""
        g = np.asarray(grades, dtype=np.float64)
        if self.numeric_range:
            lo, hi = self.numeric_range
            return np.clip((g - lo) / (hi - lo), 0.0, 1.0)
        table = {lv.grade: lv.gain for lv in self.levels}
        return np.vectorize(lambda x: table.get(float(x), 0.0), otypes=[np.float64])(g)

    def describe_gains(self) -> str:
        """The gain map named in every report."""
        if self.numeric_range:
            lo, hi = self.numeric_range
            return f"{self.gain_map_name or self.name}: gain = (r - {lo:g}) / ({hi:g} - {lo:g})"
        pairs = ", ".join(f"{lv.label} {lv.gain:g}" for lv in self.levels)
        return f"{self.gain_map_name or self.name}: {pairs}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GradeScale:
        data = dict(data)
        data["levels"] = tuple(GradeLevel(**lv) for lv in data.get("levels", ()))
        if data.get("numeric_range") is not None:
            data["numeric_range"] = tuple(data["numeric_range"])
        return cls(**data)


ESCI = GradeScale(
    name="esci",
    levels=(
        GradeLevel("Exact", 3.0, 1.0),
        GradeLevel("Substitute", 2.0, 0.1),
        GradeLevel("Complement", 1.0, 0.01),
        GradeLevel("Irrelevant", 0.0, 0.0),
    ),
    positive_threshold=2.0,
    top_threshold=3.0,
    gain_map_name="ESCI gains",
)

# ESCI's published files use single letters.
ESCI_LETTERS = {"E": "Exact", "S": "Substitute", "C": "Complement", "I": "Irrelevant"}

WANDS = GradeScale(
    name="wands",
    levels=(
        GradeLevel("Exact", 2.0, 1.0),
        GradeLevel("Partial", 1.0, 0.5),
        GradeLevel("Irrelevant", 0.0, 0.0),
    ),
    positive_threshold=1.0,
    top_threshold=2.0,
    gain_map_name="WANDS gains",
)

HOMEDEPOT = GradeScale(
    name="homedepot",
    numeric_range=(1.0, 3.0),
    # Mean of 1 (irrelevant), 2 (partial), 3 (perfect) ratings: 2.33+ means most raters said
    # partial-or-better, the analogue of ESCI's substitute-or-better.
    positive_threshold=2.33,
    top_threshold=3.0,
    gain_map_name="Home Depot linear gains",
)

# The generated catalog grades by rule with the ESCI labels.
SYNTHETIC = ESCI

GRADE_SCALES: dict[str, GradeScale] = {
    s.name: s for s in (ESCI, WANDS, HOMEDEPOT)
} | {"synthetic": SYNTHETIC}


def grade_scale(name: str | dict[str, Any]) -> GradeScale:
    """A named scale, or a custom one given as a mapping: ``name``, either ``levels`` (best
    first: ``label``, ``grade``, ``gain``) or ``numeric_range`` ([min, max], linear gain), and
    ``positive_threshold`` / ``top_threshold`` (stage-1 positives; Recall and MRR's top grade)."""
    if isinstance(name, dict):
        try:
            return GradeScale.from_dict(name)
        except TypeError as exc:
            raise ValueError(f"custom grade scale: {exc}") from None
    try:
        return GRADE_SCALES[name]
    except KeyError:
        raise ValueError(
            f"unknown grade scale {name!r} (known: {', '.join(sorted(GRADE_SCALES))})"
        ) from None


@dataclass
class TableCounts:
    """read = accepted + rejected, per table, recorded in the manifest."""

    read: int = 0
    accepted: int = 0
    rejected: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)

    def check(self, table: str) -> None:
        if self.read != self.accepted + self.rejected:
            raise AssertionError(
                f"{table}: read {self.read} != accepted {self.accepted} + rejected {self.rejected}"
            )
