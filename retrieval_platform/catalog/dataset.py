"""Reading a prepared dataset (the output of ``data_jobs.prepare_catalog``)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from retrieval_platform.catalog.schema import PREPARED_SCHEMAS, GradeScale
from retrieval_platform.errors import PlatformError
from retrieval_platform.io import read_json
from retrieval_platform.storage import canonical, fetch

Qrels = dict[str, dict[str, float]]  # query_id -> product_id -> grade


class PreparedDataset:
    """Products, queries and judgments in the canonical schema, with their grade scale."""

    def __init__(self, path: str | Path) -> None:
        self.location = canonical(path)  # where it lives (a URI on a cluster)
        self.path = fetch(path)  # a local copy on this node
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise PlatformError(
                f"{self.path} is not a prepared dataset (no manifest.json): "
                "run `python -m data_jobs.prepare_catalog` first"
            )
        self.manifest: dict[str, Any] = read_json(manifest)
        self.scale = GradeScale.from_dict(self.manifest["grade_scale"])

    def _read(self, kind: str, columns: list[str] | None, split: str | None) -> pa.Table:
        folder = self.path / kind
        files = sorted(folder.glob("*.parquet"))
        if not files:
            empty = PREPARED_SCHEMAS[kind].empty_table()
            return empty.select(columns) if columns else empty
        filters = [("split", "=", split)] if split else None
        read_columns = columns
        if columns is not None and split and "split" not in columns:
            read_columns = [*columns, "split"]  # the filter needs the column
        table = pq.read_table([str(f) for f in files], columns=read_columns, filters=filters,
                              schema=PREPARED_SCHEMAS[kind])
        return table.select(columns) if columns is not None else table

    def products(self, columns: list[str] | None = None) -> pa.Table:
        return self._read("products", columns, None)

    def queries(self, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
        return self._read("queries", columns, split)

    def judgments(self, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
        return self._read("judgments", columns, split)

    def product_files(self) -> list[str]:
        return [str(f) for f in sorted((self.path / "products").glob("*.parquet"))]

    def products_dataset(self, columns: list[str] | None = None, rows_per_block: int = 1024,
                         table: pa.Table | None = None):
        """The products (or ``table``, some of them) as a Ray Dataset of small blocks, so that
        every actor of a pool that consumes it has work (a prepared catalog is a few large
        files). The driver reads only the columns asked for; the blocks go to the object
        store."""
        import ray.data

        table = self.products(columns) if table is None else table
        blocks = [table.slice(i, rows_per_block)
                  for i in range(0, max(table.num_rows, 1), rows_per_block)]
        return ray.data.from_arrow(blocks)

    def query_texts(self, split: str | None = None) -> dict[str, str]:
        """query id -> query text, for one split (or all)."""
        table = self.queries(split, ["query_id", "text"])
        return dict(zip(table["query_id"].to_pylist(), table["text"].to_pylist(), strict=True))

    def positives(self, split: str | None = None,
                  threshold: float | None = None) -> dict[str, list[str]]:
        """query id -> its judged products at or above ``threshold`` (default: the scale's
        substitute-or-better); queries without one are left out."""
        threshold = self.scale.positive_threshold if threshold is None else threshold
        out = {q: [p for p, g in j.items() if g >= threshold] for q, j in self.qrels(split).items()}
        return {q: ps for q, ps in out.items() if ps}

    def qrels(self, split: str | None = None) -> Qrels:
        table = self.judgments(split, columns=["query_id", "product_id", "grade"])
        out: Qrels = defaultdict(dict)
        for q, p, g in zip(*(table[c].to_pylist() for c in ("query_id", "product_id", "grade")),
                           strict=True):
            out[q][p] = g
        return dict(out)
