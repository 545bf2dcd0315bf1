"""Ray Serve deployments: a batching query encoder, one deployment per index shard, a BM25
deployment, and an async FastAPI ingress that fans out to the shards and merges.

Versions: every encoder, shard and BM25 replica holds the versions listed in its
``user_config`` (``{"versions": {name: index_dir}}``); the ingress serves the one its own
``user_config`` names active. A swap loads the new version everywhere (in place, through
``reconfigure``), then flips the ingress, then drops the old one, so every request is answered
by one version end to end and none is dropped (:mod:`retrieval_platform.serving.control`).
"""


import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.metrics import Counter, Histogram

from retrieval_platform.index.store import load_bm25, load_shard
from retrieval_platform.retrievers.hybrid import Fusion
from retrieval_platform.serving import guard
from retrieval_platform.serving.schemas import (
    Health,
    SearchRequest,
    SearchResponse,
    ShardStatus,
)
from retrieval_platform.serving.search import (
    candidate_depth,
    combine,
    lexical_hits,
    load_encoder_for,
    merge_hits,
    shard_hits_many,
    to_filter,
    uses_dense,
    uses_lexical,
)

log = logging.getLogger("ray.serve")
REPLICA_RETRIES = 2  # calls retried on another replica when theirs is lost mid-call
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
BATCH_SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]


def _reload(loaded: dict[str, Any], user_config: dict[str, Any],
            load: Callable[[str], Any]) -> dict[str, Any]:
    """The versions ``user_config`` names: those already loaded are kept, new ones loaded
    (``load(index_dir)``), the others dropped."""
    wanted = user_config.get("versions") or {}
    if not wanted:
        raise ValueError("user_config.versions must name at least one index version")
    return {v: loaded[v] if v in loaded else load(index_dir) for v, index_dir in wanted.items()}


@serve.deployment
class QueryEncoder:
    """Encodes queries with the model of each loaded index version, batching concurrent ones."""

    def __init__(self, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.005,
                 precision: str = "fp32", threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.models: dict[str, Any] = {}
        self.precision = precision
        self._encode_batch.set_max_batch_size(max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.latency = Histogram("rp_encode_latency_ms", description="query encoding per batch",
                                 boundaries=LATENCY_BOUNDARIES_MS)
        self.batch_sizes = Histogram("rp_encode_batch_size", description="queries per batch",
                                     boundaries=BATCH_SIZE_BOUNDARIES)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        # on the GPU Ray gave this replica, if any (encoder.gpus)
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        self.models = _reload(self.models, user_config,
                              lambda index_dir: load_encoder_for(index_dir, device))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _encode_batch(self, items: list[tuple[str, str]]) -> list[np.ndarray]:
        started = time.perf_counter()
        out: list[np.ndarray | None] = [None] * len(items)
        by_version: dict[str, list[int]] = {}
        for i, (version, _) in enumerate(items):
            by_version.setdefault(version, []).append(i)
        for version, idx in by_version.items():
            model = self.models.get(version)
            if model is None:
                raise KeyError(f"version {version!r} is not loaded on this encoder")
            texts = [items[i][1] for i in idx]
            # Torch releases the GIL: run it off the event loop so the next batch can gather.
            vecs = await asyncio.get_running_loop().run_in_executor(
                None, lambda m=model, t=texts: m.encode(t, "query", precision=self.precision))
            for j, i in enumerate(idx):
                out[i] = vecs[j : j + 1]
        self.latency.observe((time.perf_counter() - started) * 1000)
        self.batch_sizes.observe(len(items))
        return out  # type: ignore[return-value]

    async def encode_many(self, version: str, texts: list[str]) -> np.ndarray:
        """(n, d) unit query vectors: one call for an ingress's batch of requests (they join
        this replica's batches like single requests)."""
        parts = await asyncio.gather(*(self._encode_batch((version, t)) for t in texts))
        return np.concatenate(parts)  # (n, d)

    def loaded(self) -> list[str]:
        return sorted(self.models)


@serve.deployment
class IndexShard:
    """One shard of every loaded index version (exact or approximate FAISS search)."""

    def __init__(self, shard_id: int) -> None:
        self.shard_id = shard_id
        self.shards: dict[str, Any] = {}
        self.latency = Histogram("rp_shard_search_latency_ms", description="search of one shard",
                                 boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("shard",))
        self.latency.set_default_tags({"shard": str(shard_id)})

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.shards = _reload(self.shards, user_config,
                              lambda index_dir: load_shard(index_dir, self.shard_id))

    def search_many(self, version: str, xq: np.ndarray, k: int,
                    filters: list[dict[str, Any] | None]) -> list[list[dict[str, Any]]]:
        """Top-k of each query vector of ``xq`` (n, d), with its own filters: one call for an
        ingress's batch; the unfiltered queries go to FAISS as one batch."""
        started = time.perf_counter()
        shard = self.shards.get(version)
        if shard is None:
            raise KeyError(f"version {version!r} is not loaded on shard {self.shard_id}")
        hits = shard_hits_many(shard, xq, k, [to_filter(f) for f in filters])
        self.latency.observe((time.perf_counter() - started) * 1000)
        return hits

    def ping(self, version: str) -> bool:
        return version in self.shards


@serve.deployment
class LexicalIndex:
    """BM25 over the whole catalog of every loaded version (lexical and hybrid requests)."""

    def __init__(self) -> None:
        self.indexes: dict[str, Any] = {}

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.indexes = _reload(self.indexes, user_config, load_bm25)

    def search(self, version: str, query: str, k: int,
               filters: dict[str, Any] | None) -> list[dict[str, Any]]:
        bm25, meta = self.indexes[version]
        return lexical_hits(bm25, meta, query, k, to_filter(filters))


def _lap(timings: dict[str, float], name: str, since: float) -> float:
    """Record the milliseconds since ``since`` under ``name``; return now."""
    now = time.perf_counter()
    timings[name] = (now - since) * 1000
    return now


@dataclass
class _Dense:
    """One request's share of a batched dense retrieval."""

    hits: list[dict[str, Any]]  # merged over the shards that answered
    answered: list[int]
    failed: list[int]
    timings: dict[str, float]


class ShardFailure(Exception):
    def __init__(self, failed: list[int], answered: list[int], hits: list[list[dict]]) -> None:
        super().__init__(f"shards {failed} failed")
        self.failed, self.answered, self.hits = failed, answered, hits


app = FastAPI(
    title="retrieval-platform",
    version="1",
    description="Semantic product search: a Siamese dual encoder over sharded FAISS indexes, "
                "with BM25 and hybrid (RRF) modes and catalog filters.",
)
# Before @serve.ingress: Serve freezes a copy of the app when it decorates the class.
app.add_middleware(guard.GuardMiddleware)


@serve.deployment
@serve.ingress(app)
class Ingress:
    """HTTP entry point: validates, encodes, fans out to every shard, merges, fuses."""

    def __init__(self, encoder: Any, shards: list[Any], lexical: Any | None, *,
                 api_key: str | None = None, max_body_bytes: int = 16_384,
                 timeout_s: float = 10.0, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.002) -> None:
        # Through the module object: Serve pickles this class by value, with a copy of the
        # globals it names, so a module-level dict named here would be a private copy.
        guard.configure(api_key=api_key, max_body_bytes=max_body_bytes)
        self.encoder = encoder
        self.shards = shards
        self.lexical = lexical
        self.timeout_s = timeout_s
        self.active = ""
        self.model_id = ""
        self.fusion = Fusion()
        self.requests = Counter("rp_requests_total", description="search requests",
                                tag_keys=("mode", "status"))
        self.stage_latency = Histogram(
            "rp_stage_latency_ms", description="time of one request in each stage, as the "
            "ingress sees it (encode, shards, merge, lexical, total)",
            boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("stage",))
        # Concurrent dense requests go out together: one encoder call and one call per shard
        # for the batch, instead of 1 + shards calls for every request (each call costs both
        # processes CPU time, the scarce thing on a small box). 1: every request alone.
        self._dense_batch.set_max_batch_size(max_batch_size)
        self._dense_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.active = user_config["active"]
        self.model_id = user_config.get("model_id", "")
        self.fusion = Fusion(**(user_config.get("fusion") or {}))  # the active version's

    async def _call(self, method: Any, *args: Any) -> Any:
        """``method.remote(*args)`` within the request timeout. A replica lost mid-call (its
        node died, or it was being replaced) is retried on another replica of the deployment:
        the router stops choosing a replica once a call to it failed this way."""
        for attempt in range(REPLICA_RETRIES):
            try:
                return await asyncio.wait_for(method.remote(*args), timeout=self.timeout_s)
            except RayActorError as exc:
                log.warning("a replica was lost (%s); retrying on another", type(exc).__name__)
                await asyncio.sleep(0.05 * (attempt + 1))
        return await asyncio.wait_for(method.remote(*args), timeout=self.timeout_s)

    # Several batches in flight: one batch at a time would serialise the requests (encoder,
    # then shards, then the next batch), which measured slower than no batching at all.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002, max_concurrent_batches=16)
    async def _dense_batch(self, items: list[tuple[str, str, int, dict[str, Any] | None]]
                           ) -> list[_Dense | BaseException]:
        """Dense retrieval for a batch of (version, query, k, filters): per version, one
        encoder call, then one call per shard, merged per request. A failed encoder fails
        its requests; failed shards are reported per request (the caller decides on
        partial answers)."""
        out: list[_Dense | BaseException] = [None] * len(items)  # type: ignore[list-item]
        by_version: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            by_version.setdefault(item[0], []).append(i)
        for version, idx in by_version.items():
            try:
                out_v = await self._dense_version(version, [items[i] for i in idx])
            except Exception as exc:  # encoder down, timeout: every request of the group
                out_v = [exc] * len(idx)
            for i, r in zip(idx, out_v, strict=True):
                out[i] = r
        return out

    async def _dense_version(self, version: str,
                             items: list[tuple[str, str, int, dict[str, Any] | None]]
                             ) -> list[_Dense]:
        timings: dict[str, float] = {}
        lap = time.perf_counter()
        texts = [query for _, query, _, _ in items]
        k = max(depth for _, _, depth, _ in items)
        filters = [f for _, _, _, f in items]
        # The vectors come back here and go out to the shards: Ray's ownership model routes a
        # reference passed on through this process anyway, and measured slower (BENCHMARKS.md).
        xq = await self._call(self.encoder.encode_many, version, texts)  # (n, d)
        lap = _lap(timings, "encode", lap)
        calls = [self._call(h.search_many, version, xq, k, filters) for h in self.shards]
        results = await asyncio.gather(*calls, return_exceptions=True)
        lap = _lap(timings, "shards", lap)  # the slowest shard and its hop
        failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
        for i in failed:
            log.warning("shard %d failed: %r", i, results[i])
        answered = [i for i in range(len(results)) if i not in failed]
        merged = [merge_hits([results[i][j] for i in answered], depth)
                  for j, (_, _, depth, _) in enumerate(items)]
        _lap(timings, "merge", lap)
        return [_Dense(hits, answered, failed, timings) for hits in merged]

    @app.post("/search", response_model=SearchResponse,
              responses={400: {"description": "the body is not valid JSON, or a lexical or "
                                              "hybrid request to an index without BM25"},
                         401: {"description": "missing or wrong API key"},
                         413: {"description": "request body too large"},
                         503: {"description": "a shard or the encoder is unavailable"}})
    async def search(self, request: SearchRequest) -> SearchResponse:
        version, started = self.active, time.perf_counter()
        timings: dict[str, float] = {}
        filters = request.filters.model_dump() if request.filters else None
        depth = candidate_depth(request.mode, request.k)
        dense, lexical, found = [], [], None
        try:
            if uses_dense(request.mode):
                found = await self._dense_part(version, request, depth, filters)
                dense = found.hits
                timings |= found.timings
            if uses_lexical(request.mode):
                lexical = await self._lexical_part(version, request, depth, filters, timings)
        except Exception as exc:
            raise self._http_error(request.mode, exc) from None
        hits = combine(request.mode, dense, lexical, request.k, self.fusion)
        timings["total"] = (time.perf_counter() - started) * 1000
        self.requests.inc(tags={"mode": request.mode, "status": "200"})
        for stage, ms in timings.items():
            self.stage_latency.observe(ms, tags={"stage": stage})
        answered, failed = (found.answered, found.failed) if found else ([], [])
        return SearchResponse(
            results=hits, mode=request.mode, version=version, model_id=self.model_id,
            partial=bool(failed), shards=ShardStatus(answered=answered, failed=failed),
            timings_ms={k: round(v, 2) for k, v in timings.items()},
        )

    async def _dense_part(self, version: str, request: SearchRequest, depth: int,
                          filters: dict[str, Any] | None) -> _Dense:
        """The request's share of a dense batch (encode: the hop to the encoder, its batching
        and encoding; shards: the fan-out, the slowest shard and its hop; both shared by the
        batch); failed shards refuse it unless it allows a partial answer."""
        found = await self._dense_batch((version, request.query, depth, filters))
        if isinstance(found, BaseException):
            raise found
        if found.failed and not request.allow_partial:
            raise ShardFailure(found.failed, found.answered, [])
        return found

    async def _lexical_part(self, version: str, request: SearchRequest, depth: int,
                            filters: dict[str, Any] | None,
                            timings: dict[str, float]) -> list[dict[str, Any]]:
        if self.lexical is None:
            raise HTTPException(400, "this index was built without BM25: "
                                     "lexical and hybrid modes are unavailable")
        lap = time.perf_counter()
        lexical = await self._call(self.lexical.search, version, request.query, depth, filters)
        _lap(timings, "lexical", lap)
        return lexical

    def _http_error(self, mode: str, exc: Exception) -> HTTPException:
        """The one mapping of a failed request to its HTTP answer: ours (4xx) as they are; a
        shard, the encoder or BM25 unavailable (a replica down, a timeout): 503, retry."""
        if isinstance(exc, HTTPException):
            return exc
        self.requests.inc(tags={"mode": mode, "status": "503"})
        if isinstance(exc, ShardFailure):
            return HTTPException(503, f"shards {exc.failed} of {len(self.shards)} did not "
                                      "answer; retry, or set allow_partial",
                                 headers={"Retry-After": "1"})
        log.warning("search failed: %r", exc)
        return HTTPException(503, f"service unavailable ({type(exc).__name__}); retry",
                             headers={"Retry-After": "1"})

    @app.get("/healthz", response_model=Health,
             responses={503: {"description": "some shard does not answer"}})
    async def healthz(self) -> Any:
        calls = [self._call(h.ping, self.active) for h in self.shards]
        results = await asyncio.gather(*calls, return_exceptions=True)
        answered = [i for i, r in enumerate(results) if r is True]
        failed = [i for i in range(len(self.shards)) if i not in answered]
        body = Health(status="ok" if not failed else "degraded", version=self.active,
                      shards=ShardStatus(answered=answered, failed=failed))
        return JSONResponse(body.model_dump(), status_code=200 if not failed else 503)
