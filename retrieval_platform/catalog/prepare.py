"""Catalog preparation on Ray Data: read -> validate -> normalise -> render -> variant groups ->
split -> Parquet + rejects + manifest.

Row-level work (decoding, validation, text normalisation, rendering the encoder's product text)
runs as parallel Ray Data tasks. Whole-table checks (duplicate ids, judgments that name an unknown
product or query, variant groups) need only the key columns, which are gathered on the driver;
their verdicts are broadcast back to a second parallel pass. Every record read comes out exactly
once, accepted or rejected with a reason, and the manifest proves it: read = accepted + rejected.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from retrieval_platform.catalog import schema, sources
from retrieval_platform.catalog.sources import RECORD, RawSource
from retrieval_platform.catalog.validate import RowValidator
from retrieval_platform.config import to_dict
from retrieval_platform.io import checksum_tree, sha256_file, write_json
from retrieval_platform.storage import fetch_raw, publish

log = logging.getLogger(__name__)

UID = "_uid"  # file index << 40 | record: one int64 key per raw record across all files


@dataclass
class SourceConfig:
    format: Literal["synthetic", "homedepot", "esci", "wands", "canonical"] = "synthetic"
    # folder holding the source files (all formats but synthetic): local, or a storage URI
    path: str | None = None
    # canonical only: esci | wands | homedepot | synthetic, or a custom scale (a mapping:
    # name, levels [{label, grade, gain}] best first or numeric_range [min, max], thresholds)
    grade_scale: str | dict[str, Any] | None = None
    locale: str | None = "us"  # esci only: the market to keep
    num_products: int = 2000  # synthetic only
    num_queries: int | None = None  # synthetic only; default num_products / 10
    seed: int = 0  # synthetic only

    def __post_init__(self) -> None:
        if self.format != "synthetic" and not self.path:
            raise ValueError(f"source.path is required for format {self.format!r}")
        if self.format == "canonical" and not self.grade_scale:
            raise ValueError("source.grade_scale is required for format 'canonical'")


@dataclass
class SplitConfig:
    train: float = 0.8
    dev: float = 0.1
    test: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        fractions = (self.train, self.dev, self.test)
        if min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")

    def fractions(self) -> dict[str, float]:
        return {"train": self.train, "dev": self.dev, "test": self.test}


@dataclass
class PrepareConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    output_dir: str = "runs/data/synthetic"
    overwrite: bool = True
    max_product_chars: int = 512  # rendered product text, before tokenisation
    block_rows: int = 8192  # rows per Ray Data block


def read_source(cfg: SourceConfig) -> RawSource:
    if cfg.format == "synthetic":
        return sources.read_synthetic(cfg.num_products, cfg.num_queries, cfg.seed)
    # a folder in object storage (s3://bucket/catalog) is read from this node's copy of it
    path = str(fetch_raw(cfg.path))
    if cfg.format == "homedepot":
        return sources.read_homedepot(path)
    if cfg.format == "esci":
        return sources.read_esci(path, cfg.locale)
    if cfg.format == "wands":
        return sources.read_wands(path)
    return sources.read_canonical(path, cfg.grade_scale)


# ----------------------------------------------------------------------------- Ray Data UDFs


def _validate_batch(batch: pa.Table, file_index: int, **kwargs: Any) -> pa.Table:
    out = RowValidator(**kwargs)(batch)
    uid = pc.bit_wise_or(pc.shift_left(pa.scalar(file_index, pa.int64()), 40), out[RECORD])
    return out.append_column(UID, uid)


def _apply_verdicts(
    batch: pa.Table,
    reject_uids: np.ndarray,
    reject_reasons: list[str],
    fill_column: str | None = None,
    fill_keys: pa.Array | None = None,
    fill_values: pa.Array | None = None,
    fill_from: str | None = None,
) -> pa.Table:
    """Second pass: attach whole-table rejects, and fill a looked-up column (group or split)."""
    if len(reject_uids):
        pos = pc.index_in(batch[UID], value_set=pa.array(reject_uids, pa.int64()))
        late = pc.take(pa.array(reject_reasons, pa.string()), pos)
        reason = pc.coalesce(batch["_reason"], late)
        batch = batch.set_column(batch.schema.get_field_index("_reason"), "_reason", reason)
    if fill_column is not None:
        pos = pc.index_in(batch[fill_from], value_set=fill_keys)
        values = pc.take(fill_values, pos)
        if fill_column in batch.column_names:
            values = pc.coalesce(values, batch[fill_column])
            batch = batch.set_column(batch.schema.get_field_index(fill_column), fill_column, values)
        else:
            batch = batch.append_column(fill_column, values)
    return batch


def _accepted(batch: pa.Table, columns: list[str], out_schema: pa.Schema) -> pa.Table:
    kept = batch.filter(pc.is_null(batch["_reason"]))
    return kept.select(columns).cast(out_schema)


def _rejected(batch: pa.Table, table: str) -> pa.Table:
    bad = batch.filter(pc.is_valid(batch["_reason"]))
    raw = bad["_raw"].to_pylist()
    if None in raw:  # rejected by a whole-table check: keep the parsed record instead
        fields = [c for c in bad.column_names if not c.startswith("_")]
        parsed = bad.select(fields).to_pylist()
        raw = [r if r is not None else json.dumps(p, default=str, ensure_ascii=False)
               for r, p in zip(raw, parsed, strict=True)]
    return pa.table(
        {"table": pa.array([table] * bad.num_rows, pa.string()), "source_file": bad["_file"],
         "record": bad[RECORD], "reason": bad["_reason"], "raw": pa.array(raw, pa.string())},
        schema=schema.REJECT_SCHEMA,
    )


# ----------------------------------------------------------------------------- driver-side checks


def _keys(ds: ray.data.Dataset, columns: list[str]) -> pd.DataFrame:
    refs = ds.select_columns(columns).to_arrow_refs()
    tables = [t for t in ray.get(refs) if t.num_rows]
    if not tables:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    return pa.concat_tables(tables).to_pandas().sort_values(UID, kind="stable")


def _duplicates(keys: pd.DataFrame, subset: list[str], what: str) -> dict[int, str]:
    """Later records whose key was already seen -> reject reason naming the first record."""
    ok = keys[keys["_reason"].isna()]
    dup = ok.duplicated(subset=subset, keep="first")
    if not dup.any():
        return {}
    first = ok[~dup][[*subset, "_file", RECORD]]
    later = ok[dup][[*subset, UID]].merge(first, on=subset, how="left")
    return {
        int(row[UID]): (
            f"duplicate {what} (first at {row['_file']}:{row[RECORD]}; "
            f"{'/'.join(str(row[c]) for c in subset)})"
        )
        for row in later.to_dict("records")
    }


def variant_groups(product_ids: list[str], families: list[str | None],
                   title_keys: list[str]) -> list[str]:
    """METHOD.md Eq. 2, catalog rule: products are one variant group when they share a source
    family or a normalised title (transitively). The group id is the smallest family id in the
    component, or ``p:<smallest product id>`` when none has a family."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        root = x
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    for pid, fam, key in zip(product_ids, families, title_keys, strict=True):
        node = f"f:{fam}" if fam else f"p:{pid}"
        union(node, f"t:{key}")
    best: dict[str, str] = {}
    for pid, fam in zip(product_ids, families, strict=True):
        root = find(f"f:{fam}" if fam else f"p:{pid}")
        name = fam if fam else f"p:{pid}"
        if root not in best or name < best[root]:
            best[root] = name
    return [best[find(f"f:{fam}" if fam else f"p:{pid}")]
            for pid, fam in zip(product_ids, families, strict=True)]


# ----------------------------------------------------------------------------- the job


def prepare_catalog(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the preparation; returns the manifest (also written as ``manifest.json``).
    Read → validate every record (Ray Data) → whole-table checks (duplicates, unknown keys,
    variant groups) → write accepted and rejected rows → manifest."""
    started = time.perf_counter()
    source = read_source(cfg.source)
    validated, read_counts = _validate(source, cfg)
    verdicts = _table_verdicts(validated)
    with publish(cfg.output_dir, overwrite=cfg.overwrite) as tmp:
        counts, rejects = _write_tables(tmp, validated, verdicts, read_counts)
        _write_rejects(tmp, rejects, source.malformed, counts)
        manifest = {
            "schema_version": schema.SCHEMA_VERSION,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "source": {
                "format": source.format,
                "path": cfg.source.path,
                "files": {f: (sha256_file(f) if Path(f).is_file() else None)
                          for f in source.input_files},
                "ignored_columns": source.ignored_columns,
            },
            "grade_scale": source.scale.to_dict(),
            "counts": {k: vars(c) for k, c in counts.items()},
            "splits": _split_counts(tmp),
            "files": checksum_tree(tmp),
            "config": to_dict(cfg),
            "wall_seconds": round(time.perf_counter() - started, 2),
        }
        write_json(tmp / "manifest.json", manifest)
    log.info("prepared %s in %.1fs: %s", cfg.output_dir, manifest["wall_seconds"],
             {k: (c.accepted, c.rejected) for k, c in counts.items()})
    return manifest


def _validate(source: RawSource, cfg: PrepareConfig
              ) -> tuple[dict[str, ray.data.Dataset], Counter[str]]:
    """Every record of every table validated on its own (Ray Data tasks): the datasets with a
    ``_reason`` column (null = valid so far), and how many records each table read."""
    scale = source.scale.to_dict()
    validated: dict[str, ray.data.Dataset] = {}
    read_counts: Counter[str] = Counter()
    files = sorted({raw.source_file for raw in source.tables})
    for raw in source.tables:
        read_counts[raw.kind] += raw.table.num_rows
        blocks = [raw.table.slice(i, cfg.block_rows)
                  for i in range(0, max(raw.table.num_rows, 1), cfg.block_rows)]
        ds = ray.data.from_arrow(blocks).map_batches(
            _validate_batch,
            fn_kwargs=dict(
                file_index=files.index(raw.source_file), kind=raw.kind,
                source_file=raw.source_file, scale=scale, adapter=raw.adapter,
                locale=source.locale, max_product_chars=cfg.max_product_chars,
                split_seed=cfg.split.seed, split_fractions=cfg.split.fractions(),
            ),
            batch_format="pyarrow", batch_size=None, num_cpus=0.5,
        )
        validated[raw.kind] = ds if raw.kind not in validated else validated[raw.kind].union(ds)
    for rec in source.malformed:
        read_counts[rec.kind] += 1
    return {k: ds.materialize() for k, ds in validated.items()}, read_counts


def _table_verdicts(validated: dict[str, ray.data.Dataset]) -> dict[str, dict[str, Any]]:
    """Whole-table checks on the key columns: duplicate ids, judgments of unknown products or
    queries, duplicate judgments; variant groups of the accepted products and the split of each
    judgment's query. Per table: the rejected record uids with reasons, and a column to fill."""
    base = ["_reason", "_file", RECORD, UID]
    pkeys = _keys(validated["products"], ["product_id", "variant_group", "title_key", *base])
    product_rejects = _duplicates(pkeys, ["product_id"], "product_id")
    good = pkeys[pkeys["_reason"].isna() & ~pkeys[UID].isin(product_rejects)]
    groups = variant_groups(good["product_id"].tolist(),
                            [f if isinstance(f, str) else None for f in good["variant_group"]],
                            good["title_key"].tolist())
    product_ids = pa.array(good["product_id"].tolist(), pa.string())

    qkeys = _keys(validated["queries"], ["query_id", "split", *base])
    query_rejects = _duplicates(qkeys, ["query_id"], "query_id")
    goodq = qkeys[qkeys["_reason"].isna() & ~qkeys[UID].isin(query_rejects)]
    query_ids = pa.array(goodq["query_id"].tolist(), pa.string())

    jkeys = _keys(validated["judgments"], ["query_id", "product_id", *base])
    ok = jkeys[jkeys["_reason"].isna()]
    known_p = ok["product_id"].isin(set(good["product_id"]))
    known_q = ok["query_id"].isin(set(goodq["query_id"]))
    judgment_rejects = {
        int(u): f"unknown product_id (not in the accepted catalog; {p})"
        for u, p in zip(ok[UID][~known_p], ok["product_id"][~known_p], strict=True)
    } | {
        int(u): f"unknown query_id (not in the accepted queries; {q})"
        for u, q in zip(ok[UID][known_p & ~known_q], ok["query_id"][known_p & ~known_q],
                        strict=True)
    }
    judgment_rejects |= _duplicates(
        jkeys[~jkeys[UID].isin(judgment_rejects)], ["query_id", "product_id"], "judgment"
    )
    return {
        "products": dict(rejects=product_rejects, fill_column="variant_group",
                         fill_keys=product_ids, fill_values=pa.array(groups, pa.string()),
                         fill_from="product_id"),
        "queries": dict(rejects=query_rejects),
        "judgments": dict(rejects=judgment_rejects, fill_column="split", fill_keys=query_ids,
                          fill_values=pa.array(goodq["split"].tolist(), pa.string()),
                          fill_from="query_id"),
    }


def _write_tables(tmp: Path, validated: dict[str, ray.data.Dataset],
                  verdicts: dict[str, dict[str, Any]], read_counts: Counter[str]
                  ) -> tuple[dict[str, schema.TableCounts], list[ray.data.Dataset]]:
    """Apply the verdicts; write each table's accepted rows (Parquet, prepared schema); return
    the counts and each table's rejected rows."""
    counts: dict[str, schema.TableCounts] = {}
    rejects = []
    for kind, ds in validated.items():
        v = dict(verdicts[kind])
        rej = v.pop("rejects")
        final = ds.map_batches(
            _apply_verdicts,
            fn_kwargs=dict(reject_uids=np.fromiter(rej, np.int64, len(rej)),
                           reject_reasons=list(rej.values()), **v),
            batch_format="pyarrow", batch_size=None, num_cpus=0.5,
        ).materialize()
        out_schema = schema.PREPARED_SCHEMAS[kind]
        accepted = final.map_batches(
            _accepted, fn_kwargs=dict(columns=out_schema.names, out_schema=out_schema),
            batch_format="pyarrow", batch_size=None, num_cpus=0.5,
        ).materialize()
        rejected = final.map_batches(
            _rejected, fn_kwargs=dict(table=kind), batch_format="pyarrow", batch_size=None,
            num_cpus=0.5,
        ).materialize()
        (tmp / kind).mkdir()
        _write_on_driver(accepted, tmp / kind, out_schema)
        rejects.append(rejected)
        reasons = Counter(_reason_class(r) for r in _column(rejected, "reason"))
        counts[kind] = schema.TableCounts(
            read=read_counts[kind], accepted=accepted.count(),
            rejected=rejected.count(), reject_reasons=dict(reasons),
        )
    return counts, rejects


def _write_rejects(tmp: Path, rejects: list[ray.data.Dataset], malformed: list[Any],
                   counts: dict[str, schema.TableCounts]) -> None:
    """Every rejected record (validation, whole-table checks, and records the reader could
    not parse) into ``rejects/``; counts checked: read = accepted + rejected per table."""
    table = pa.table(
        {"table": [m.kind for m in malformed],
         "source_file": [m.source_file for m in malformed],
         "record": [m.record for m in malformed],
         "reason": [m.reason for m in malformed],
         "raw": [m.raw for m in malformed]},
        schema=schema.REJECT_SCHEMA,
    )
    for m in malformed:
        c = counts[m.kind]
        c.rejected += 1
        key = _reason_class(m.reason)
        c.reject_reasons[key] = c.reject_reasons.get(key, 0) + 1
    (tmp / "rejects").mkdir()
    all_rejects = rejects[0].union(*rejects[1:], ray.data.from_arrow(table))
    if sum(c.rejected for c in counts.values()):
        _write_on_driver(all_rejects, tmp / "rejects", schema.REJECT_SCHEMA)
    for kind, c in counts.items():
        c.check(kind)


def _write_on_driver(ds: ray.data.Dataset, folder: Path, out_schema: pa.Schema,
                     rows_per_file: int = 1 << 20) -> None:
    """Write a dataset's rows as Parquet files in this process's local folder. Ray Data's own
    writers run in tasks on any node, and a local folder exists only on this one: the folder
    is then published (renamed, or uploaded to storage) as a whole."""
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    table = (pa.concat_tables([t.cast(out_schema) for t in tables]) if tables
             else out_schema.empty_table())  # an empty table still carries the schema
    for part, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
        pq.write_table(table.slice(start, rows_per_file), folder / f"part-{part:05d}.parquet")


def _column(ds: ray.data.Dataset, name: str) -> list[Any]:
    tables = [t for t in ray.get(ds.select_columns([name]).to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables)[name].to_pylist() if tables else []


def _reason_class(reason: str) -> str:
    """'duplicate product_id (first at ...)' -> 'duplicate product_id': the part before details."""
    return reason.split(" (", 1)[0]


def _split_counts(root: Path) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for kind in ("queries", "judgments"):
        files = sorted((root / kind).glob("*.parquet"))
        if not files:
            continue
        table = pq.read_table([str(f) for f in files], columns=["split"])
        for split, n in Counter(table["split"].to_pylist()).items():
            out.setdefault(split, {})[kind] = n
    return out
