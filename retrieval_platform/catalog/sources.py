"""Readers for the supported source formats, into raw tables with canonical column names.

A reader only locates files, checks that the required columns exist (a missing one is a fatal
:class:`CatalogFormatError` naming the file and the column), renames columns to the canonical
names and numbers every record. Per-row parsing and validation happen later, in parallel, in Ray
Data (:mod:`retrieval_platform.catalog.validate`), so that a bad row is quarantined with a reason
instead of failing the whole job.

Formats:

- ``homedepot``: Home Depot search relevance (``products.csv``: product_uid, product_title;
  ``judgments.csv``: id, product_uid, product_title, search_term, relevance 1–3).
- ``esci``: Amazon Shopping Queries (``shopping_queries_dataset_products.parquet`` and
  ``shopping_queries_dataset_examples.parquet``, with their published column names).
- ``wands``: Wayfair WANDS (``product.csv``, ``query.csv``, ``label.csv``, tab-separated).
- ``canonical``: ``products.parquet``, ``queries.parquet``, ``judgments.parquet`` (files or folders)
  already in the canonical schema, with a named grade scale.
- ``synthetic``: the embedded generator (:mod:`retrieval_platform.catalog.synthetic`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval_platform.catalog import schema
from retrieval_platform.catalog.synthetic import generate_catalog
from retrieval_platform.errors import PlatformError

RECORD = "_record"  # 1-based line number in a CSV file (header = line 1), or row in Parquet


class CatalogFormatError(PlatformError, ValueError):
    """A source file cannot be read as its format says (missing file or column, bad header)."""


@dataclass
class RawTable:
    """One source file's records for one canonical table, columns renamed to canonical names."""

    kind: str  # products | queries | judgments
    source_file: str
    table: pa.Table
    adapter: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # format quirks, per row


@dataclass
class MalformedRecord:
    """A record the file parser itself could not split into fields (wrong field count)."""

    kind: str
    source_file: str
    record: int
    reason: str
    raw: str


@dataclass
class RawSource:
    format: str
    scale: schema.GradeScale
    tables: list[RawTable]
    malformed: list[MalformedRecord] = field(default_factory=list)
    input_files: list[str] = field(default_factory=list)
    ignored_columns: dict[str, list[str]] = field(default_factory=dict)
    locale: str | None = None  # keep only this market; records of others are rejected


# ----------------------------------------------------------------------------- file helpers


def _require_file(path: Path) -> Path:
    if not path.exists():
        raise CatalogFormatError(f"{path}: file not found")
    return path


def _read_csv(path: Path, kind: str, delimiter: str, malformed: list[MalformedRecord]) -> pa.Table:
    """All columns as raw bytes (decoded strictly, per row, later), with line numbers.

    Python's csv module, not pyarrow's reader: a record of the wrong width whose text is not
    UTF-8 makes pyarrow fail the whole file, and csv gives the line where each record starts
    (multi-line quoted fields included). Invalid bytes survive as bytes (surrogateescape), so
    the validator can reject exactly the field that holds them."""
    _require_file(path)
    csv.field_size_limit(64 * 1024 * 1024)
    with path.open("r", encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise CatalogFormatError(f"{path}: unreadable header ({exc})") from None
        if not header or not any(h.strip() for h in header):
            raise CatalogFormatError(f"{path}: empty file or empty header line")
        header[0] = header[0].lstrip("\ufeff")
        if any(_has_surrogates(h) for h in header):
            raise CatalogFormatError(f"{path}: the header line is not UTF-8")
        if len(set(header)) != len(header):
            raise CatalogFormatError(f"{path}: duplicate column names in the header: {header}")
        columns: list[list[bytes]] = [[] for _ in header]
        records: list[int] = []
        line = reader.line_num
        while True:
            start = line + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise CatalogFormatError(f"{path}: line {start}: {exc}") from None
            line = reader.line_num
            if not row:  # a blank line is no record
                continue
            if len(row) != len(header):
                text = delimiter.join(row).encode("utf-8", "surrogateescape")
                malformed.append(MalformedRecord(
                    kind, str(path), start,
                    f"malformed record: expected {len(header)} fields, got {len(row)}",
                    json.dumps({"text": text.decode("utf-8", "backslashreplace")}),
                ))
                continue
            for column, value in zip(columns, row, strict=True):
                column.append(value.encode("utf-8", "surrogateescape"))
            records.append(start)
    table = {name: pa.array(col, pa.binary()) for name, col in zip(header, columns, strict=True)}
    return pa.table(table | {RECORD: pa.array(records, pa.int64())})


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _read_parquet(path: Path) -> pa.Table:
    _require_file(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CatalogFormatError(f"{path}: not a readable Parquet file or folder ({exc})") from None
    return table.append_column(RECORD, pa.array(np.arange(1, table.num_rows + 1), pa.int64()))


def _map_columns(
    table: pa.Table,
    path: Path,
    required: dict[str, str],
    optional: dict[str, str],
    known_unused: tuple[str, ...],
    ignored: dict[str, list[str]],
) -> pa.Table:
    """Rename source columns to canonical names; a missing required column is fatal."""
    names = set(table.column_names) - {RECORD}
    for src in required:
        if src not in names:
            raise CatalogFormatError(
                f"{path}: missing required column {src!r} (found: {', '.join(sorted(names))})"
            )
    mapping = required | {k: v for k, v in optional.items() if k in names}
    extra = sorted(names - set(mapping) - set(known_unused))
    if extra:
        ignored[str(path)] = extra
    cols = {dst: table.column(src) for src, dst in mapping.items()}
    cols[RECORD] = table.column(RECORD)
    return pa.table(cols)


def _distinct_first(table: pa.Table, keys: list[str]) -> pa.Table:
    """The first record of each distinct key tuple (queries derived from a judgments file)."""
    grouped = table.select([*keys, RECORD]).group_by(keys, use_threads=False).aggregate(
        [(RECORD, "min")]
    )
    return grouped.rename_columns([*keys, RECORD]).sort_by(RECORD)


# ----------------------------------------------------------------------------- row adapters
# Module-level functions, so that Ray can ship them to the validation workers.


def esci_product_adapter(row: dict[str, Any]) -> dict[str, Any]:
    bullets = row.pop("bullets", None)
    if bullets:
        row["description"] = " ".join(x for x in (row.get("description"), bullets) if x)
    colour = row.pop("colour", None)
    if colour:
        row["attributes"] = {"colour": colour}
    return row


def wands_product_adapter(row: dict[str, Any]) -> dict[str, Any]:
    category = row.get("category")
    if isinstance(category, str) and category:
        row["category"] = " > ".join(p.strip() for p in category.split("/") if p.strip())
    features = row.get("attributes")
    if isinstance(features, str):
        attrs = {}
        for item in features.split("|"):
            key, sep, value = item.partition(":")
            if sep and key.strip() and value.strip():
                attrs[key.strip()] = value.strip()
        row["attributes"] = attrs
    product_class = row.pop("product_class", None)
    if product_class and isinstance(row.get("attributes"), dict):
        row["attributes"]["class"] = product_class
    return row


def esci_label_adapter(row: dict[str, Any]) -> dict[str, Any]:
    label = row.get("label")
    if isinstance(label, str) and label.strip() in schema.ESCI_LETTERS:
        row["label"] = schema.ESCI_LETTERS[label.strip()]
    return row


# ----------------------------------------------------------------------------- readers


def read_homedepot(
    path: str | Path,
    products_file: str = "products.csv",
    judgments_file: str = "judgments.csv",
) -> RawSource:
    root = Path(path)
    malformed: list[MalformedRecord] = []
    ignored: dict[str, list[str]] = {}
    p_path, j_path = root / products_file, root / judgments_file
    products = _map_columns(
        _read_csv(p_path, "products", ",", malformed), p_path,
        {"product_uid": "product_id", "product_title": "title"}, {}, (), ignored,
    )
    judgments = _read_csv(j_path, "judgments", ",", malformed)
    judgments = _map_columns(
        judgments, j_path,
        {"product_uid": "product_id", "search_term": "query_text", "relevance": "grade"},
        {}, ("id", "product_title"), ignored,
    )
    queries = _distinct_first(judgments, ["query_text"]).rename_columns(["text", RECORD])
    return RawSource(
        "homedepot", schema.HOMEDEPOT,
        [RawTable("products", str(p_path), products),
         RawTable("queries", str(j_path), queries),
         RawTable("judgments", str(j_path), judgments)],
        malformed, [str(p_path), str(j_path)], ignored,
    )


ESCI_PRODUCTS = "shopping_queries_dataset_products.parquet"
ESCI_EXAMPLES = "shopping_queries_dataset_examples.parquet"


def read_esci(path: str | Path, locale: str | None = "us") -> RawSource:
    """Amazon ESCI. ``locale`` keeps one market (its product ids repeat across markets)."""
    root = Path(path)
    ignored: dict[str, list[str]] = {}
    p_path, e_path = root / ESCI_PRODUCTS, root / ESCI_EXAMPLES
    products = _map_columns(
        _read_parquet(p_path), p_path,
        {"product_id": "product_id", "product_title": "title"},
        {"product_description": "description", "product_bullet_point": "bullets",
         "product_brand": "brand", "product_color": "colour", "product_locale": "locale"},
        (), ignored,
    )
    examples = _map_columns(
        _read_parquet(e_path), e_path,
        {"query_id": "query_id", "query": "query_text", "product_id": "product_id",
         "esci_label": "label"},
        {"product_locale": "locale"},
        ("example_id", "small_version", "large_version", "split"), ignored,
    )
    keys = ["query_id", "query_text"] + (["locale"] if "locale" in examples.column_names else [])
    queries = _distinct_first(examples, keys).rename_columns(
        ["query_id", "text", *keys[2:], RECORD]
    )
    return RawSource(
        "esci", schema.ESCI,
        [RawTable("products", str(p_path), products, esci_product_adapter),
         RawTable("queries", str(e_path), queries),
         RawTable("judgments", str(e_path), examples, esci_label_adapter)],
        [], [str(p_path), str(e_path)], ignored, locale,
    )


def read_wands(path: str | Path) -> RawSource:
    root = Path(path)
    malformed: list[MalformedRecord] = []
    ignored: dict[str, list[str]] = {}
    p_path, q_path, l_path = root / "product.csv", root / "query.csv", root / "label.csv"
    products = _map_columns(
        _read_csv(p_path, "products", "\t", malformed), p_path,
        {"product_id": "product_id", "product_name": "title"},
        {"product_class": "product_class", "category hierarchy": "category",
         "product_description": "description", "product_features": "attributes"},
        ("rating_count", "average_rating", "review_count"), ignored,
    )
    queries = _map_columns(
        _read_csv(q_path, "queries", "\t", malformed), q_path,
        {"query_id": "query_id", "query": "text"}, {}, ("query_class",), ignored,
    )
    labels = _map_columns(
        _read_csv(l_path, "judgments", "\t", malformed), l_path,
        {"query_id": "query_id", "product_id": "product_id", "label": "label"}, {}, ("id",),
        ignored,
    )
    return RawSource(
        "wands", schema.WANDS,
        [RawTable("products", str(p_path), products, wands_product_adapter),
         RawTable("queries", str(q_path), queries),
         RawTable("judgments", str(l_path), labels)],
        malformed, [str(p_path), str(q_path), str(l_path)], ignored,
    )


def read_canonical(path: str | Path, grade_scale: str | dict[str, Any]) -> RawSource:
    root = Path(path)
    ignored: dict[str, list[str]] = {}
    tables, files = [], []
    for kind, table_schema in schema.SCHEMAS.items():
        candidates = [root / f"{kind}.parquet", root / kind]
        found = next((c for c in candidates if c.exists()), None)
        if found is None and kind == "products":
            raise CatalogFormatError(f"{root}: no {kind}.parquet (file or folder)")
        if found is None:  # a catalog of products only: index and serve it, nothing to train
            empty = pa.table({f.name: pa.array([], f.type) for f in table_schema}
                             | {RECORD: pa.array([], pa.int64())})
            tables.append(RawTable(kind, f"{root} (no {kind})", empty))
            continue
        required = {f.name: f.name for f in table_schema if not f.nullable}
        optional = {f.name: f.name for f in table_schema if f.nullable}
        tables.append(
            RawTable(kind, str(found),
                     _map_columns(_read_parquet(found), found, required, optional, (), ignored))
        )
        files.append(str(found))
    return RawSource("canonical", schema.grade_scale(grade_scale), tables, [], files, ignored)


def read_synthetic(num_products: int, num_queries: int | None, seed: int) -> RawSource:
    catalog = generate_catalog(num_products, num_queries=num_queries, seed=seed)
    name = f"synthetic(num_products={num_products}, seed={seed})"
    tables = []
    for kind, table in (("products", catalog.products), ("queries", catalog.queries),
                        ("judgments", catalog.judgments)):
        table = table.append_column(RECORD, pa.array(np.arange(1, table.num_rows + 1), pa.int64()))
        tables.append(RawTable(kind, f"{name}/{kind}", table))
    return RawSource("synthetic", schema.SYNTHETIC, tables, [], [name], {})

