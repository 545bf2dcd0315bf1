"""The catalog writer: the one Serve deployment that appends to a live catalog's change log.

A write is validated against the current catalog (:class:`~retrieval_platform.catalog.live.
LiveCatalog`), its product embedded by the encoder deployment with each served version's model
(the same encode path the build's Ray Data job runs), given the next sequence number and
appended to the log in the index's storage; only then is it acknowledged. Concurrent writes are
grouped (``serve.batch``): one embedding call and one log segment for the group, so bulk and
concurrent writers cost one storage write per group, not per product. Groups run one at a time,
which keeps the sequence numbers in the order the catalog was validated in.

One replica (``num_replicas: 1``): the single writer a dense, ordered log needs. A replica that
restarts (another node, after a crash) rebuilds its catalog from the version and the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray import serve
from ray.serve.metrics import Counter, Histogram

from retrieval_platform.catalog.live import LiveCatalog, Staged, WriteOp, WriteResult
from retrieval_platform.index.changelog import (
    Change,
    ChangeLog,
    ChangeLogError,
    encode_vector,
    log_location,
    model_key,
)
from retrieval_platform.index.store import load_manifest

log = logging.getLogger("ray.serve")
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]


class WriteUnavailable(Exception):
    """The group could not be embedded or logged: nothing of it was applied; retry."""


@serve.deployment
class CatalogWriter:
    def __init__(self, encoder: Any, max_batch_size: int = 64,
                 batch_wait_timeout_s: float = 0.002) -> None:
        self.encoder = encoder
        self.catalog: LiveCatalog | None = None
        self.log: ChangeLog | None = None
        # model_key -> the versions embedding with it (any loaded one will do: during a swap the
        # encoder and the writer learn of a version's arrival and departure at different times)
        self.models: dict[str, list[str]] = {}
        self._write_group.set_max_batch_size(max_batch_size)
        self._write_group.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.writes = Counter("rp_writes_total", description="catalog writes",
                              tag_keys=("op", "status"))
        self.group_latency = Histogram("rp_write_group_latency_ms", description="validate, "
                                       "embed and log one group of writes",
                                       boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("stage",))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        manifests = {v: load_manifest(d) for v, d in (user_config.get("versions") or {}).items()}
        if not manifests:
            raise ValueError("user_config.versions must name at least one index version")
        logs = {log_location(m.path) for m in manifests.values()}
        if len(logs) != 1:
            raise ValueError(f"the served versions belong to different catalogs ({sorted(logs)}):"
                             " a writer appends to one change log")
        self.log = ChangeLog(logs.pop())
        if self.catalog is None:
            self.catalog = LiveCatalog.of_version(
                max(manifests.values(), key=lambda m: m.log_position))
        self.catalog.apply(list(self.log.read_after(self.catalog.position)))
        self.models = {}
        for version, m in manifests.items():
            self.models.setdefault(model_key(m.model.model_id, m.dim), []).append(version)

    async def write(self, ops: list[WriteOp]) -> list[WriteResult]:
        """Validate, embed, log and acknowledge ``ops`` (in order); per op its result. Raises
        :class:`WriteUnavailable` when nothing could be logged."""
        results = await self._write_group(ops)
        if isinstance(results, BaseException):
            raise results
        return results

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def _write_group(self, requests: list[list[WriteOp]]
                           ) -> list[list[WriteResult] | BaseException]:
        try:
            flat = await self._write_ops([op for ops in requests for op in ops])
        except WriteUnavailable as exc:
            return [exc] * len(requests)
        out, i = [], 0
        for ops in requests:
            out.append(flat[i : i + len(ops)])
            i += len(ops)
        return out

    async def _write_ops(self, ops: list[WriteOp]) -> list[WriteResult]:
        assert self.catalog is not None and self.log is not None
        started = time.perf_counter()
        staged, overlay = self.catalog.stage(ops)
        # per upsert and model: the vector given with the write (the bulk job's), else embedded
        given = [(s, (op.vectors or {}) if s.op == "upsert" and op.op == "upsert" else {})
                 for op, s in zip(ops, staged, strict=True) if isinstance(s, Staged)]
        vectors: dict[tuple[int, str], Any] = {}
        try:
            for key, versions in self.models.items():
                missing = [i for i, (s, v) in enumerate(given) if s.op == "upsert" and key not in v]
                if missing:
                    xb = await self.encoder.encode_products.remote(
                        versions, [given[i][0].text for i in missing])
                    vectors |= {(i, key): xb[j] for j, i in enumerate(missing)}
        except Exception as exc:
            raise WriteUnavailable(f"the encoder could not embed the products ({exc!r})") \
                from None
        embedded = time.perf_counter()
        seq, now, changes = self.catalog.position + 1, time.time(), []
        for i, (s, v) in enumerate(given):
            vecs = ({key: encode_vector(v[key] if key in v else vectors[(i, key)])
                     for key in self.models} if s.op == "upsert" else {})
            changes.append(Change(seq + len(changes), s.op, s.product_id, s.record, vecs, now))
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.log.append, changes)
        except ChangeLogError as exc:  # another writer: take its changes, refuse this group
            self.catalog.apply(list(self.log.read_after(self.catalog.position)))
            raise WriteUnavailable(str(exc)) from None
        except Exception as exc:
            raise WriteUnavailable(f"the change log could not be written ({exc!r})") from None
        self.catalog.commit(overlay, seq + len(changes) - 1)
        self.group_latency.observe((embedded - started) * 1000, tags={"stage": "embed"})
        self.group_latency.observe((time.perf_counter() - embedded) * 1000, tags={"stage": "log"})
        results, logged = [], iter(changes)  # staged writes in order, each with its change
        for s in staged:
            if isinstance(s, Staged):
                change = next(logged)
                status = 201 if s.result == "created" else 200
                results.append(WriteResult(s.product_id, s.op, status, s.result, change.seq))
            else:
                results.append(s)
            self.writes.inc(tags={"op": results[-1].op, "status": str(results[-1].status)})
        return results

    def get(self, product_id: str) -> tuple[dict[str, Any] | None, int]:
        assert self.catalog is not None
        return self.catalog.record(product_id), self.catalog.position

    def position(self) -> int:
        return self.catalog.position if self.catalog else 0

