"""Query augmentation for stage 1 (the paper's last ablation row): extra (query, positive) pairs
whose query is a training query as shoppers also type it.

- **Typos**: in one word of four letters or more, a keyboard-neighbour substitution, a dropped
  letter, a doubled letter or two adjacent letters swapped. A result that is a word of the
  catalog's vocabulary is refused: "hose" → "hoe" is another query, not a misspelling.
- **Spacing and unit variants**: a number and its unit joined or split ("100watts" ↔
  "100 watts") and the unit written another way ("watt" / "watts" / "w"), but only in a form the
  catalog itself uses, so the variant is one the products can match.

The variants keep their query's positives, negative pool and labelled positives (so the label
rule of Eq. 2 masks the original's positive where both share a batch). Seeded: the same config
gives the same pairs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# each row: the ways one unit is written. Not "in" (inches): "2 in 1 ladder" is no length.
UNITS: tuple[tuple[str, ...], ...] = (
    ("watt", "watts", "w"), ("volt", "volts", "v"), ("amp", "amps"), ("inch", "inches"),
    ("foot", "feet", "ft"), ("gallon", "gallons", "gal"), ("pound", "pounds", "lb", "lbs"),
    ("ounce", "ounces", "oz"), ("quart", "quarts", "qt"), ("millimeter", "mm"),
    ("centimeter", "cm"), ("btu",), ("psi",), ("piece", "pieces", "pc", "pcs"),
    ("pack", "pk"), ("gauge", "ga"), ("cubic ft", "cu ft", "cu. ft."),
)
_FORM_TO_UNIT = {form: row for row in UNITS for form in row}
_UNIT_PATTERN = re.compile(
    r"(?<![\w.])(\d+(?:\.\d+)?)(\s*)(" + "|".join(sorted(
        (re.escape(f) for f in _FORM_TO_UNIT), key=len, reverse=True)) + r")(?![\w])")

_KEYBOARD = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _neighbours() -> dict[str, str]:
    """Each letter's neighbours on a QWERTY keyboard (same row, and the rows above and below)."""
    where = {c: (r, i) for r, row in enumerate(_KEYBOARD) for i, c in enumerate(row)}
    out = {}
    for c, (r, i) in where.items():
        near = [d for d, (r2, i2) in where.items()
                if d != c and abs(r2 - r) <= 1 and abs(i2 - i) <= 1]
        out[c] = "".join(sorted(near))
    return out


NEIGHBOURS = _neighbours()
TYPO_KINDS = ("neighbour", "drop", "double", "swap")


@dataclass
class AugmentConfig:
    """``data.augment`` of a stage-1 config (null: no augmentation)."""

    typos_per_query: int = 1  # misspelt variants of each training query
    unit_variants: int = 1  # spacing / unit variants of each query that has a number and unit
    query_fraction: float = 1.0  # the share of training queries that get variants
    seed: int = 0

    def __post_init__(self) -> None:
        if self.typos_per_query < 0 or self.unit_variants < 0:
            raise ValueError("augment.typos_per_query and unit_variants must be >= 0")
        if not 0 < self.query_fraction <= 1:
            raise ValueError("augment.query_fraction must be in (0, 1]")


@dataclass(frozen=True)
class Vocabulary:
    """What the catalog writes: its words (a typo must not land on one) and the unit forms it
    puts after a number (a unit variant uses only those)."""

    words: frozenset[str]
    unit_forms: frozenset[str]


def vocabulary(texts: Iterable[str]) -> Vocabulary:
    """The lower-cased words and number-unit forms of ``texts``."""
    words: set[str] = set()
    forms: set[str] = set()
    for text in texts:
        text = text.lower()
        words.update(re.findall(r"[a-z0-9]+(?:\.[a-z0-9]+)*", text))
        forms.update(m.group(3) for m in _UNIT_PATTERN.finditer(text))
    return Vocabulary(frozenset(words), frozenset(forms))


def typo(word: str, kind: str, rng: np.random.Generator) -> str:
    """``word`` with one typo of ``kind`` at a random position (never its first letter)."""
    i = int(rng.integers(1, len(word)))
    if kind == "neighbour":
        near = NEIGHBOURS.get(word[i], "")
        return word[:i] + near[int(rng.integers(len(near)))] + word[i + 1:] if near else word
    if kind == "drop":
        return word[:i] + word[i + 1:]
    if kind == "double":
        return word[:i] + word[i] + word[i:]
    return word[:i - 1] + word[i] + word[i - 1] + word[i + 1:]  # swap with the letter before


def typo_variants(query: str, n: int, vocab: Vocabulary, rng: np.random.Generator,
                  attempts: int = 20) -> list[str]:
    """Up to ``n`` distinct misspellings of ``query`` (one typo each, no vocabulary word)."""
    words = query.split(" ")
    spots = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    out: list[str] = []
    for _ in range(attempts):
        if len(out) >= n or not spots:
            break
        at = spots[int(rng.integers(len(spots)))]
        wrong = typo(words[at].lower(), TYPO_KINDS[int(rng.integers(len(TYPO_KINDS)))], rng)
        if wrong == words[at].lower() or wrong in vocab.words:
            continue
        variant = " ".join([*words[:at], wrong, *words[at + 1:]])
        if variant not in out:
            out.append(variant)
    return out


def unit_variants(query: str, n: int, vocab: Vocabulary,
                  rng: np.random.Generator) -> list[str]:
    """Up to ``n`` rewrites of the query's first number-and-unit: joined or split, or its unit
    in another form the catalog uses after a number."""
    query = query.lower()
    match = _UNIT_PATTERN.search(query)
    if match is None:
        return []
    number, _, form = match.groups()
    forms = [f for f in _FORM_TO_UNIT[form] if f == form or f in vocab.unit_forms]
    rewrites = {f"{number}{s}{f}" for f in forms for s in ("", " ")} - {match.group(0)}
    options = sorted(query[:match.start()] + r + query[match.end():] for r in rewrites)
    pick = rng.permutation(len(options))[:n]
    return [options[i] for i in sorted(pick)]


def augment_queries(queries: dict[str, str], vocab: Vocabulary,
                    cfg: AugmentConfig) -> dict[str, list[str]]:
    """Variants of each query (its id -> them), for ``cfg.query_fraction`` of the queries."""
    rng = np.random.default_rng(cfg.seed)
    out: dict[str, list[str]] = {}
    for qid in sorted(queries):
        if rng.random() >= cfg.query_fraction:
            continue
        text = queries[qid]
        variants = unit_variants(text, cfg.unit_variants, vocab, rng)
        variants += [v for v in typo_variants(text, cfg.typos_per_query, vocab, rng)
                     if v not in variants]
        if variants:
            out[qid] = variants
    return out
