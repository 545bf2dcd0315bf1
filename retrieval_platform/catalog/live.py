"""The writer's view of a live catalog: every product's current record (the version's
prepared catalog plus the change log), against which writes are validated and turned into
:class:`~retrieval_platform.index.changelog.Change` entries.

A write is checked here before anything is logged: the product's fields go through the
prepared catalog's own rule (:func:`~retrieval_platform.catalog.validate.validate_product`),
so a live product's text is rendered exactly as the build renders it, and its vector
(embedded by the writer) equals the one a rebuild gives. A PATCH that changes the rendered
text is logged as an upsert of the whole record (it must be re-embedded); one that changes
only price or in-stock is logged as a patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa

from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.catalog.validate import RowError, validate_product
from retrieval_platform.index.changelog import Change, Op
from retrieval_platform.index.live import PATCHABLE
from retrieval_platform.index.store import IndexManifest

STORED = ("product_id", "title", "description", "brand", "category", "attributes", "price",
          "in_stock", "variant_group", "text")  # a record as the prepared catalog holds it
WRITABLE = ("title", "description", "brand", "category", "attributes", "price", "in_stock")


@dataclass(frozen=True)
class WriteOp:
    """One requested write: an upsert (``fields`` the whole product), a patch (``fields`` the
    ones to change) or a delete."""

    op: Op
    product_id: str
    fields: dict[str, Any] | None = None
    # an upsert embedded beforehand (the bulk job's Ray Data pass): model_key -> (d,) vector
    vectors: dict[str, Any] | None = None


@dataclass(frozen=True)
class WriteResult:
    """What became of one write: ``status`` an HTTP status (200, 201, 404, 422); ``seq`` its
    change's sequence number once logged (the log position a replica must reach to show it)."""

    product_id: str
    op: Op
    status: int
    result: Literal["created", "updated", "patched", "deleted", "rejected"]
    seq: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class Staged:
    """A validated write waiting for its sequence number (and, for an upsert, its vector)."""

    op: Op
    product_id: str
    record: dict[str, Any] | None
    result: Literal["created", "updated", "patched", "deleted"]

    @property
    def text(self) -> str | None:
        return self.record["text"] if self.op == "upsert" and self.record else None


class LiveCatalog:
    """Every product's current record: ``products`` (a prepared catalog's table) overlaid with
    the changes applied since."""

    def __init__(self, products: pa.Table, position: int, max_product_chars: int = 512) -> None:
        self.base = products
        self.base_pos = {p: i for i, p in enumerate(products["product_id"].to_pylist())}
        self.changed: dict[str, dict[str, Any] | None] = {}  # None: deleted
        self.position = position
        self.max_product_chars = max_product_chars

    @classmethod
    def of_version(cls, manifest: IndexManifest) -> LiveCatalog:
        """The catalog an index version was built from, at the version's log position."""
        ds = PreparedDataset(manifest.dataset.path)
        max_chars = int((ds.manifest.get("config") or {}).get("max_product_chars", 512))
        return cls(ds.products(list(STORED)), manifest.log_position, max_chars)

    def record(self, product_id: str) -> dict[str, Any] | None:
        if product_id in self.changed:
            return self.changed[product_id]
        i = self.base_pos.get(product_id)
        if i is None:
            return None
        row = self.base.slice(i, 1).to_pylist()[0]
        return {k: row.get(k) for k in STORED}

    def __contains__(self, product_id: str) -> bool:
        return self.record(product_id) is not None

    def stage(self, ops: list[WriteOp]) -> tuple[list[Staged | WriteResult],
                                                 dict[str, dict[str, Any] | None]]:
        """Validate ``ops`` in order (each sees the ones before it); (per op a
        :class:`Staged` write or a rejection, the records they would leave). Nothing changes
        until :meth:`commit`."""
        overlay: dict[str, dict[str, Any] | None] = {}

        def current(pid: str) -> dict[str, Any] | None:
            return overlay[pid] if pid in overlay else self.record(pid)

        out: list[Staged | WriteResult] = []
        for op in ops:
            before = current(op.product_id)
            try:
                staged = self._stage_one(op, before)
            except RowError as exc:
                out.append(WriteResult(op.product_id, op.op, 422, "rejected", error=str(exc)))
                continue
            except KeyError:
                out.append(WriteResult(op.product_id, op.op, 404, "rejected",
                                       error=f"no product {op.product_id!r}"))
                continue
            overlay[op.product_id] = (None if staged.op == "delete" else
                                      before | staged.record if staged.op == "patch" and before
                                      else staged.record)
            out.append(staged)
        return out, overlay

    def _stage_one(self, op: WriteOp, now: dict[str, Any] | None) -> Staged:
        if op.op == "delete":
            if now is None:
                raise KeyError(op.product_id)
            return Staged("delete", op.product_id, None, "deleted")
        if op.op == "upsert":
            record = self._validated({"product_id": op.product_id, **(op.fields or {})})
            return Staged("upsert", op.product_id, record,
                          "updated" if now is not None else "created")
        if now is None:
            raise KeyError(op.product_id)
        merged = self._validated({**{k: now.get(k) for k in WRITABLE},
                                  "variant_group": now.get("variant_group"),
                                  **(op.fields or {}), "product_id": op.product_id})
        if merged["text"] != now.get("text"):  # the text changed: re-embed, a whole upsert
            return Staged("upsert", op.product_id, merged, "updated")
        return Staged("patch", op.product_id, {k: merged[k] for k in PATCHABLE}, "patched")

    def _validated(self, row: dict[str, Any]) -> dict[str, Any]:
        record = validate_product(row, max_product_chars=self.max_product_chars)
        record["variant_group"] = record["variant_group"] or record["product_id"]
        return {k: record[k] for k in STORED}

    def commit(self, overlay: dict[str, dict[str, Any] | None], position: int) -> None:
        self.changed.update(overlay)
        self.position = position

    def apply(self, changes: list[Change]) -> None:
        """Changes logged elsewhere (a replay on start, another writer's): taken as they are."""
        for c in changes:
            if c.seq <= self.position:
                continue
            if c.op == "delete":
                self.changed[c.product_id] = None
            elif c.op == "upsert":
                self.changed[c.product_id] = {k: (c.record or {}).get(k) for k in STORED}
            else:
                now = self.record(c.product_id)
                if now is not None:
                    self.changed[c.product_id] = now | (c.record or {})
            self.position = c.seq

    def table(self) -> pa.Table:
        """The whole current catalog in the prepared schema's columns (compaction)."""
        keep = [i for p, i in self.base_pos.items() if p not in self.changed]
        base = self.base.take(pa.array(keep, pa.int64()))
        # attributes come back from the log's JSON as [key, value] lists; Arrow maps want pairs
        changed = [r | {"attributes": [tuple(a) for a in r["attributes"]] if r.get("attributes")
                        else None}
                   for r in self.changed.values() if r is not None]
        if not changed:
            return base
        extra = pa.Table.from_pylist(changed, schema=base.select(list(STORED)).schema)
        return pa.concat_tables([base.select(list(STORED)), extra])
