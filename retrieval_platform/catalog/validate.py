"""Per-row validation and normalisation, run in parallel as a Ray Data UDF.

Every raw record comes out exactly once: as a canonical row, or with ``_reason`` set (the column
and what is wrong with it) and ``_raw`` holding the record as JSON. Checks that need the whole
table (duplicate ids, judgments that name an unknown product) happen afterwards, in
:mod:`retrieval_platform.catalog.prepare`.
"""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa

from retrieval_platform.catalog import schema
from retrieval_platform.catalog.sources import RECORD
from retrieval_platform.catalog.text import (
    normalize_text,
    query_id_from_text,
    render_product_text,
    title_key,
)

MAX_ID_CHARS = 256
# control characters (C0, DEL, C1), lone surrogates, line and paragraph separators: an id is
# printed in logs, URLs and JSON Lines, where each of these breaks a line or a parser
_NOT_IN_IDS = frozenset({"Cc", "Cs", "Zl", "Zp"})
MAX_QUERY_CHARS = 1000
MAX_TEXT_CHARS = 100_000

META_FIELDS = [
    pa.field("_reason", pa.string()),
    pa.field("_raw", pa.string()),
    pa.field("_file", pa.string(), nullable=False),
    pa.field(RECORD, pa.int64(), nullable=False),
]

VALIDATED_SCHEMAS = {
    "products": pa.schema(
        [f.with_nullable(True) for f in schema.PRODUCT_SCHEMA]
        + [pa.field("text", pa.string()), pa.field("title_key", pa.string())]
        + META_FIELDS
    ),
    "queries": pa.schema(
        [f.with_nullable(True) for f in schema.QUERY_SCHEMA]
        + [pa.field("split", pa.string())]
        + META_FIELDS
    ),
    "judgments": pa.schema(
        [f.with_nullable(True) for f in schema.JUDGMENT_SCHEMA] + META_FIELDS
    ),
}


class RowError(ValueError):
    """A field of one record is invalid; the message becomes the reject reason."""


def assign_split(query_id: str, seed: int, fractions: Mapping[str, float]) -> str:
    """Deterministic split of one query: the same id lands in the same split for a seed."""
    digest = hashlib.blake2b(f"{seed}:{query_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    total = 0.0
    names = list(fractions)
    for name in names:
        total += fractions[name]
        if u < total:
            return name
    return names[-1]


def _decode(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RowError(f"{name}: invalid UTF-8 at byte {exc.start}") from None
    if isinstance(value, str):
        return value
    raise RowError(f"{name}: expected text, got {type(value).__name__}")


def _text(row: Mapping[str, Any], name: str, *, required: bool, max_chars: int) -> str | None:
    text = _decode(name, row.get(name))
    if text is not None:
        text = normalize_text(text)
        if len(text) > max_chars:
            raise RowError(f"{name}: longer than {max_chars} characters")
    if not text:
        if required:
            raise RowError(f"{name}: missing or empty")
        return None
    return text


def _identifier(row: Mapping[str, Any], name: str) -> str:
    value = row.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # numeric ids in Parquet sources
    text = _decode(name, value)
    text = text.strip() if text else ""
    if not text:
        raise RowError(f"{name}: missing or empty")
    if len(text) > MAX_ID_CHARS or any(unicodedata.category(c) in _NOT_IN_IDS for c in text):
        raise RowError(f"{name}: not a valid id ({text[:40]!r})")
    return text


def _price(row: Mapping[str, Any]) -> float | None:
    value = row.get("price")
    if isinstance(value, bytes | str):
        value = _decode("price", value).strip().lstrip("$")
        if not value:
            return None
        try:
            value = float(value)
        except ValueError:
            raise RowError(f"price: not a number ({value[:40]!r})") from None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RowError(f"price: expected a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise RowError(f"price: must be a finite number >= 0 (got {value})")
    return float(value)


_TRUE, _FALSE = {"true", "1", "yes", "y", "t"}, {"false", "0", "no", "n", "f"}


def _in_stock(row: Mapping[str, Any]) -> bool | None:
    value = row.get("in_stock")
    if isinstance(value, bytes | str):
        text = _decode("in_stock", value).strip().lower()
        if not text:
            return None
        if text not in _TRUE | _FALSE:
            raise RowError(f"in_stock: expected true or false ({text[:40]!r})")
        return text in _TRUE
    if value is None or isinstance(value, bool):
        return value
    raise RowError(f"in_stock: expected true or false, got {type(value).__name__}")


def _attributes(row: Mapping[str, Any]) -> list[tuple[str, str]] | None:
    value = row.get("attributes")
    if isinstance(value, bytes | str):
        text = _decode("attributes", value).strip()
        if not text:
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise RowError("attributes: not a JSON object") from None
    if value is None:
        return None
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list) and all(isinstance(p, list | tuple) and len(p) == 2
                                         for p in value):
        items = [tuple(p) for p in value]
    else:
        raise RowError(f"attributes: expected a mapping, got {type(value).__name__}")
    out = []
    for key, val in items:
        if not isinstance(key, str) or not key.strip():
            raise RowError("attributes: keys must be non-empty text")
        if val is None:
            continue
        if isinstance(val, int | float) and not isinstance(val, bool):
            val = f"{val:g}"
        if not isinstance(val, str):
            raise RowError(f"attributes[{key!r}]: expected text, got {type(val).__name__}")
        val = normalize_text(val)
        if val:
            out.append((normalize_text(key), val))
    return out or None


def _raw_json(row: Mapping[str, Any]) -> str:
    def enc(v: Any) -> Any:
        if isinstance(v, bytes):
            return v.decode("utf-8", errors="backslashreplace")
        return repr(v)

    return json.dumps({k: v for k, v in row.items() if k != RECORD}, default=enc,
                      ensure_ascii=False)


def validate_product(row: Mapping[str, Any], *, max_product_chars: int = 512) -> dict[str, Any]:
    """One product record (canonical field names) validated, normalised and rendered into the
    encoder's text: the one rule for a prepared catalog and for live writes (the serving
    index's ``PUT /products/{id}``). Raises :class:`RowError` naming the field."""
    product_id = _identifier(row, "product_id")
    title = _text(row, "title", required=True, max_chars=MAX_TEXT_CHARS)
    description = _text(row, "description", required=False, max_chars=MAX_TEXT_CHARS)
    brand = _text(row, "brand", required=False, max_chars=MAX_ID_CHARS)
    category = _text(row, "category", required=False, max_chars=MAX_TEXT_CHARS)
    attributes = _attributes(row)
    price = _price(row)
    in_stock = _in_stock(row)
    group = row.get("variant_group")
    group = _identifier(row, "variant_group") if group not in (None, b"", "") else None
    text = render_product_text(
        title, brand=brand, category=category, attributes=dict(attributes or ()),
        description=description, max_chars=max_product_chars,
    )
    return {"product_id": product_id, "title": title, "description": description,
            "brand": brand, "category": category, "attributes": attributes, "price": price,
            "in_stock": in_stock,
            "variant_group": group, "text": text, "title_key": title_key(title)}


class RowValidator:
    """Ray Data UDF: raw records (canonical column names) -> validated rows of one table."""

    def __init__(
        self,
        kind: str,
        source_file: str,
        scale: dict[str, Any],
        adapter: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        locale: str | None = None,
        max_product_chars: int = 512,
        split_seed: int = 0,
        split_fractions: Mapping[str, float] | None = None,
    ) -> None:
        self.kind = kind
        self.source_file = source_file
        self.scale = schema.GradeScale.from_dict(scale)
        self.adapter = adapter
        self.locale = locale
        self.max_product_chars = max_product_chars
        self.split_seed = split_seed
        self.split_fractions = dict(split_fractions or {"train": 0.8, "dev": 0.1, "test": 0.1})
        self.out_schema = VALIDATED_SCHEMAS[kind]
        self.parse = {"products": self._product, "queries": self._query,
                      "judgments": self._judgment}[kind]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for raw in batch.to_pylist():
            out: dict[str, Any] = {"_file": self.source_file, RECORD: raw[RECORD]}
            try:
                # CSV sources arrive as raw bytes: decode strictly, naming the column on failure.
                row = {k: _decode(k, v) if isinstance(v, bytes) else v for k, v in raw.items()}
                if self.locale and "locale" in row:
                    locale = _decode("locale", row.pop("locale"))
                    if locale != self.locale:
                        raise RowError(
                            f"locale {locale!r} not selected (source.locale={self.locale})"
                        )
                if self.adapter is not None:
                    row = self.adapter(row)
                out.update(self.parse(row))
            except RowError as exc:
                out = {"_file": self.source_file, RECORD: raw[RECORD], "_reason": str(exc),
                       "_raw": _raw_json(raw)}
            except Exception as exc:  # a bug must not lose the row either
                out = {"_file": self.source_file, RECORD: raw[RECORD],
                       "_reason": f"unreadable record ({type(exc).__name__}: {exc})",
                       "_raw": _raw_json(raw)}
            rows.append(out)
        return pa.Table.from_pylist(rows, schema=self.out_schema)

    def _product(self, row: dict[str, Any]) -> dict[str, Any]:
        return validate_product(row, max_product_chars=self.max_product_chars)

    def _query(self, row: dict[str, Any]) -> dict[str, Any]:
        text = _text(row, "text", required=True, max_chars=MAX_QUERY_CHARS)
        if row.get("query_id") in (None, b"", ""):
            query_id = query_id_from_text(text)
        else:
            query_id = _identifier(row, "query_id")
        split = assign_split(query_id, self.split_seed, self.split_fractions)
        return {"query_id": query_id, "text": text, "split": split}

    def _judgment(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("query_id") in (None, b"", ""):
            query_id = query_id_from_text(
                _text(row, "query_text", required=True, max_chars=MAX_QUERY_CHARS)
            )
        else:
            query_id = _identifier(row, "query_id")
        product_id = _identifier(row, "product_id")
        raw_grade = row.get("grade")
        raw_label = row.get("label")
        try:
            if raw_grade is not None and raw_grade != b"":
                grade, label = self.scale.parse(str(raw_grade))
                if raw_label is not None:
                    label = _decode("label", raw_label)
            elif raw_label is not None:
                grade, label = self.scale.parse(_decode("label", raw_label) or "")
            else:
                raise RowError("grade: missing (neither a grade nor a label)")
        except ValueError as exc:
            raise RowError(f"grade: {exc}") from None
        return {"query_id": query_id, "product_id": product_id, "grade": grade, "label": label}
