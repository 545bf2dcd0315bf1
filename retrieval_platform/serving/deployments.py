"""Ray Serve deployments: a batching query encoder, one deployment per index shard, a BM25
deployment, and an async FastAPI ingress that fans out to the shards and merges.

Versions: every encoder, shard and BM25 replica holds the versions listed in its
``user_config`` (``{"versions": {name: index_dir}}``); the ingress serves the one its own
``user_config`` names active. A swap loads the new version everywhere (in place, through
``reconfigure``), then flips the ingress, then drops the old one, so every request is answered
by one version end to end and none is dropped (:mod:`retrieval_platform.serving.control`).
"""


import asyncio
import dataclasses
import itertools
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from fastapi import FastAPI, Header, HTTPException, Path
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.metrics import Counter, Histogram

from retrieval_platform.catalog.live import WriteOp, WriteResult
from retrieval_platform.experiments.arms import Experiment, key_hash
from retrieval_platform.experiments.eventlog import (
    INTERLEAVED_SEP,
    Event,
    EventLog,
    Impression,
    now,
)
from retrieval_platform.experiments.interleaving import team_draft
from retrieval_platform.index.live import (
    LogFollower,
    load_live_lexical,
    load_live_shard,
    load_live_texts,
)
from retrieval_platform.reranker.scoring import load_reranker_folder, rerank_order
from retrieval_platform.retrievers.hybrid import Fusion
from retrieval_platform.serving import guard
from retrieval_platform.serving.schemas import (
    MAX_PRODUCT_ID_CHARS,
    BulkRequest,
    BulkResponse,
    EventsRequest,
    EventsResponse,
    Health,
    ProductFields,
    ProductPatch,
    ProductRecord,
    SearchRequest,
    SearchResponse,
    ShardStatus,
    WriteResponse,
    write_op,
)
from retrieval_platform.serving.search import (
    candidate_depth,
    combine,
    load_encoder_for,
    merge_hits,
    shard_hits_many,
    to_filter,
    uses_dense,
    uses_lexical,
)

log = logging.getLogger("ray.serve")
# what every write route may answer besides its own success (the OpenAPI spec says all of it)
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "the body is not valid JSON"},
    401: {"description": "missing or wrong X-Write-Key"},
    403: {"description": "a read-only deployment (no write key configured)"},
    413: {"description": "the body (or a bulk's item count) is too large"},
    422: {"description": "invalid fields"},
    503: {"description": "not applied (the writer, encoder or log is unavailable); retry"},
}

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
                 precision: str = "fp32", threads: int | None = None,
                 runtime: str = "torch") -> None:
        if threads:
            torch.set_num_threads(threads)
        self.models: dict[str, Any] = {}
        self.precision, self.runtime = precision, runtime
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
                              lambda index_dir: self._loaded(index_dir, device))

    def _loaded(self, index_dir: str, device: str) -> Any:
        encoder = load_encoder_for(index_dir, device)
        if self.runtime == "onnx":  # exported and checked against torch now, not at a request
            encoder.model.ort_backbone(self.precision)
        return encoder

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
                None, lambda m=model, t=texts: m.encode(t, "query", precision=self.precision,
                                                  runtime=self.runtime))
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

    async def encode_products(self, versions: list[str], texts: list[str]) -> np.ndarray:
        """(n, d) product vectors of live upserts, as the build of ``versions`` (of one model)
        embeds products: the same model, precision and encode path; any of them loaded."""
        model = next((self.models[v] for v in versions if v in self.models), None)
        if model is None:
            raise KeyError(f"none of the versions {versions} is loaded on this encoder")
        return await asyncio.get_running_loop().run_in_executor(
            None, model.encode_products, texts)

    def loaded(self) -> list[str]:
        return sorted(self.models)


class _Followed:
    """The versions a replica serves, each a live segment following the catalog's change log
    (replayed on load, before the replica answers; then polled)."""

    def __init__(self, load: Callable[[str], Any], interval_s: float) -> None:
        self.load, self.interval_s = load, interval_s
        self.parts: dict[str, Any] = {}
        self.followers: dict[str, LogFollower] = {}

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        def start(index_dir: str) -> Any:
            part, changelog = self.load(index_dir)
            self.followers[index_dir] = LogFollower(
                changelog, part.apply, lambda: part.position, self.interval_s).start()
            return part

        wanted = set((user_config.get("versions") or {}).values())
        self.parts = _reload(self.parts, user_config, start)
        for index_dir in [d for d in self.followers if d not in wanted]:
            self.followers.pop(index_dir).stop()

    def get(self, version: str, where: str) -> Any:
        part = self.parts.get(version)
        if part is None:
            raise KeyError(f"version {version!r} is not loaded on {where}")
        return part


@serve.deployment
class IndexShard:
    """One shard of every loaded index version (exact or approximate FAISS search), with the
    catalog's live writes (a delta segment, tombstones, patched metadata: ``index.live``)."""

    def __init__(self, shard_id: int, log_poll_interval_s: float = 0.05) -> None:
        self.shard_id = shard_id
        self.versions = _Followed(lambda index_dir: load_live_shard(index_dir, shard_id),
                                  log_poll_interval_s)
        self.latency = Histogram("rp_shard_search_latency_ms", description="search of one shard",
                                 boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("shard",))
        self.latency.set_default_tags({"shard": str(shard_id)})

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.versions.reconfigure(user_config)

    def search_many(self, version: str, xq: np.ndarray, k: int,
                    filters: list[dict[str, Any] | None]
                    ) -> tuple[list[list[dict[str, Any]]], int]:
        """(top-k of each query vector of ``xq`` (n, d) with its own filters, the log position
        applied): one call for an ingress's batch; the unfiltered queries go to FAISS as one
        batch."""
        started = time.perf_counter()
        shard = self.versions.get(version, f"shard {self.shard_id}")
        position = shard.position  # read first: the answer has at least these changes
        hits = shard_hits_many(shard, xq, k, [to_filter(f) for f in filters])
        self.latency.observe((time.perf_counter() - started) * 1000)
        return hits, position

    def ping(self, version: str) -> bool:
        return version in self.versions.parts


@serve.deployment
class LexicalIndex:
    """BM25 over the whole catalog of every loaded version (lexical and hybrid requests), with
    the live writes (new documents scored with the base's statistics: ``index.live``)."""

    def __init__(self, log_poll_interval_s: float = 0.05) -> None:
        self.versions = _Followed(load_live_lexical, log_poll_interval_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.versions.reconfigure(user_config)

    def search(self, version: str, query: str, k: int,
               filters: dict[str, Any] | None) -> tuple[list[dict[str, Any]], int]:
        lexical = self.versions.get(version, "the lexical index")
        position = lexical.position
        return lexical.search(query, k, to_filter(filters)), position


@serve.deployment
class Reranker:
    """The cross-encoder: scores a request's candidates against its query, batching concurrent
    requests into one forward pass. It reads each candidate's rendered text from the catalog of
    every loaded version (its change log followed, like the shards)."""

    def __init__(self, model: str, max_batch_size: int = 4, batch_wait_timeout_s: float = 0.002,
                 precision: str = "fp32", threads: int | None = None,
                 log_poll_interval_s: float = 0.05) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.model, self.model_id = load_reranker_folder(model)
        self.precision = precision
        self.texts = _Followed(load_live_texts, log_poll_interval_s)
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.latency = Histogram("rp_rerank_latency_ms", description="reranker forward pass per "
                                 "batch of requests", boundaries=LATENCY_BOUNDARIES_MS)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.texts.reconfigure(user_config)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.002)
    async def _score_batch(self, items: list[tuple[str, str, list[str], list[str]]]
                           ) -> list[list[float]]:
        started = time.perf_counter()
        queries, products, sizes = [], [], []
        for version, query, ids, titles in items:
            texts = self.texts.get(version, "the reranker").get(ids, titles)
            queries += [query] * len(texts)
            products += texts
            sizes.append(len(texts))
        scores = await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.model.score(queries, products, precision=self.precision))
        self.latency.observe((time.perf_counter() - started) * 1000)
        bounds = np.cumsum([0, *sizes])
        return [scores[lo:hi].tolist() for lo, hi in itertools.pairwise(bounds)]

    async def score(self, version: str, query: str, product_ids: list[str],
                    titles: list[str]) -> list[float]:
        """The reranker's score of each candidate (its catalog text; its title where the
        catalog does not hold it yet)."""
        return await self._score_batch((version, query, product_ids, titles))

    def info(self) -> str:
        return self.model_id


async def _nothing() -> None:
    return None


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
    position: int  # the change log position every answering shard had applied


@dataclass
class _Answer:
    """One version's answer to a request (an interleaved request has two)."""

    hits: list[dict[str, Any]]
    found: _Dense | None  # the dense part, if the mode has one
    positions: list[int]  # the change log positions its parts had applied
    reranked: bool
    rerank_error: str | None


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

    def __init__(self, encoder: Any, shards: list[Any], lexical: Any | None,
                 writer: Any | None = None, reranker: Any | None = None, *,
                 rerank_default: bool = False, rerank_depth: int = 50,
                 rerank_timeout_s: float = 2.0, api_key: str | None = None,
                 write_key: str | None = None, max_body_bytes: int = 16_384,
                 max_write_body_bytes: int = 4 << 20, max_bulk_items: int = 1000,
                 timeout_s: float = 10.0, write_timeout_s: float = 60.0,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.002,
                 impressions: dict[str, Any] | None = None) -> None:
        # Through the module object: Serve pickles this class by value, with a copy of the
        # globals it names, so a module-level dict named here would be a private copy.
        guard.configure(api_key=api_key, write_key=write_key, max_body_bytes=max_body_bytes,
                        max_write_body_bytes=max_write_body_bytes)
        self.encoder = encoder
        self.shards = shards
        self.lexical = lexical
        self.writer = writer
        self.reranker = reranker
        self.rerank_default, self.rerank_depth = rerank_default, rerank_depth
        self.rerank_timeout_s = rerank_timeout_s
        self.max_bulk_items = max_bulk_items
        self.write_timeout_s = write_timeout_s
        self.timeout_s = timeout_s
        self.active = ""
        self.experiment: Experiment | None = None
        self.served: dict[str, tuple[str, Fusion]] = {}  # version -> (model id, fusion)
        self.rng = random.Random()
        # the impression log: this replica's own files, flushed in the background
        self.eventlog = (EventLog(impressions["path"], max_buffered=impressions["max_buffered"])
                         if impressions else None)
        self.flush_interval_s = impressions["flush_interval_s"] if impressions else 1.0
        self._flusher: asyncio.Task | None = None
        # arm "": no experiment runs
        self.requests = Counter("rp_requests_total", description="search requests",
                                tag_keys=("mode", "status", "arm"))
        self.stage_latency = Histogram(
            "rp_stage_latency_ms", description="time of one request in each stage, as the "
            "ingress sees it (encode, shards, merge, lexical, rerank, total)",
            boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("stage", "arm"))
        self.result_counts = Histogram("rp_result_count", description="results per answer",
                                       boundaries=[1, 5, 10, 20, 50, 100], tag_keys=("arm",))
        self.empty_results = Counter("rp_empty_results_total", description="answers with no "
                                     "result", tag_keys=("mode", "arm"))
        self.impressions_dropped = Counter("rp_impressions_dropped_total", description=
                                           "impressions not logged: the buffer was full")
        self.rerank_fallbacks = Counter("rp_rerank_fallbacks_total", description="requests "
                                        "answered un-reranked because the reranker failed or "
                                        "was too slow", tag_keys=("reason",))
        # Concurrent dense requests go out together: one encoder call and one call per shard
        # for the batch, instead of 1 + shards calls for every request (each call costs both
        # processes CPU time, the scarce thing on a small box). 1: every request alone.
        self._dense_batch.set_max_batch_size(max_batch_size)
        self._dense_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        # replaced whole, never changed in place: a request holds the one it started with
        active = user_config["active"]
        self.served = {v: (m["model_id"], Fusion(**(m.get("fusion") or {})))
                       for v, m in (user_config.get("arm_versions") or {}).items()} | {
            active: (user_config.get("model_id", ""),
                     Fusion(**(user_config.get("fusion") or {})))}
        experiment = user_config.get("experiment")
        self.active = active
        self.experiment = Experiment.from_dict(experiment) if experiment else None

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
        merged = [merge_hits([results[i][0][j] for i in answered], depth)
                  for j, (_, _, depth, _) in enumerate(items)]
        position = min((results[i][1] for i in answered), default=0)
        _lap(timings, "merge", lap)
        return [_Dense(hits, answered, failed, timings, position) for hits in merged]

    @app.post("/search", response_model=SearchResponse,
              responses={400: {"description": "the body is not valid JSON, or a lexical or "
                                              "hybrid request to an index without BM25"},
                         401: {"description": "missing or wrong API key"},
                         413: {"description": "request body too large"},
                         503: {"description": "a shard or the encoder is unavailable"}})
    async def search(self, request: SearchRequest,
                     x_user_id: str | None = Header(
                         None, min_length=1, max_length=256,
                         description="the assignment key when the body names no user_id or "
                                     "session_id")) -> SearchResponse:
        started = time.perf_counter()
        key = request.user_id or request.session_id or x_user_id
        # one snapshot: a swap, ramp or stop arriving mid-request does not change this answer
        experiment, served = self.experiment, self.served
        arm, assignment, versions = self._route(experiment, key)
        timings: dict[str, float] = {}
        answers = await asyncio.gather(
            *(self._answer(v, served[v][1], request, timings if i == 0 else {})
              for i, v in enumerate(versions)), return_exceptions=True)
        failed = next((a for a in answers if isinstance(a, BaseException)), None)
        if failed is not None:
            raise self._http_error(request.mode, failed, arm) from None
        hits, teams = answers[0].hits, None
        if len(answers) == 2:
            ids, team_of = team_draft([h["product_id"] for h in answers[0].hits],
                                      [h["product_id"] for h in answers[1].hits], request.k,
                                      self.rng)
            by_id = {h["product_id"]: h for a in reversed(answers) for h in a.hits}
            hits = [by_id[p] for p in ids]
            teams = [experiment.arms[t].name for t in team_of]
        timings["total"] = (time.perf_counter() - started) * 1000
        tags = {"mode": request.mode, "arm": arm or ""}
        self.requests.inc(tags=tags | {"status": "200"})
        self.result_counts.observe(len(hits), tags={"arm": arm or ""})
        if not hits:
            self.empty_results.inc(tags=tags)
        for stage, ms in timings.items():
            self.stage_latency.observe(ms, tags={"stage": stage, "arm": arm or ""})
        request_id = uuid.uuid4().hex
        version = INTERLEAVED_SEP.join(versions)
        if self.eventlog is not None:
            self._log_impression(Impression(
                request_id, now(), experiment.name if experiment else None, key_hash(key),
                assignment, arm or "default", version, request.query, request.mode,
                [h["product_id"] for h in hits], [float(h["score"]) for h in hits], teams))
        found = answers[0].found
        answered, failed_shards = (found.answered, found.failed) if found else ([], [])
        return SearchResponse(
            results=hits, mode=request.mode, version=version,
            model_id=INTERLEAVED_SEP.join(served[v][0] for v in versions),
            partial=any(a.found is not None and bool(a.found.failed) for a in answers),
            shards=ShardStatus(answered=answered, failed=failed_shards),
            timings_ms={k: round(v, 2) for k, v in timings.items()},
            applied_position=min((p for a in answers for p in a.positions), default=0),
            reranked=all(a.reranked for a in answers),
            rerank_error=next((a.rerank_error for a in answers if a.rerank_error), None),
            request_id=request_id, experiment=experiment.name if experiment else None,
            arm=arm, assignment=assignment,
        )

    def _route(self, experiment: Experiment | None, key: str | None
               ) -> tuple[str | None, str | None, list[str]]:
        """(arm, assignment, the versions that answer) of a request with ``key``: the active
        version without an experiment; the assigned arm's in an A/B split; both arms' when
        they are interleaved (one list goes back)."""
        if experiment is None:
            return None, None, [self.active]
        if experiment.method == "ab":
            chosen, assignment = experiment.assign(key, self.rng)
            return chosen.name, assignment, [chosen.version]
        first, second = experiment.arms[:2]
        return (INTERLEAVED_SEP.join((first.name, second.name)), "key" if key else "random",
                [first.version, second.version])

    async def _answer(self, version: str, fusion: Fusion, request: SearchRequest,
                      timings: dict[str, float]) -> _Answer:
        """``version``'s answer to ``request`` (its stages' times into ``timings``)."""
        filters = request.filters.model_dump() if request.filters else None
        rerank_depth = self._rerank_depth(request)
        depth = max(candidate_depth(request.mode, request.k), rerank_depth)
        dense, lexical, positions = [], [], []
        # A hybrid request's two parts run at once: the BM25 hop and scoring overlap the
        # encoder and the shards instead of following them.
        parts = [asyncio.ensure_future(self._dense_part(version, request, depth, filters)
                                       if uses_dense(request.mode) else _nothing()),
                 asyncio.ensure_future(self._lexical_part(version, request, depth, filters,
                                                          timings)
                                       if uses_lexical(request.mode) else _nothing())]
        try:
            found, lexical_part = await asyncio.gather(*parts)
        except Exception:
            for part in parts:  # the other part's answer is not needed any more
                part.cancel()
            raise
        if found is not None:
            dense = found.hits
            timings |= found.timings
            positions.append(found.position)
        if lexical_part is not None:
            lexical, position = lexical_part
            positions.append(position)
        hits = combine(request.mode, dense, lexical, max(request.k, rerank_depth), fusion)
        rerank_error = None
        if rerank_depth:
            hits, rerank_error = await self._reranked(version, request.query, hits,
                                                      rerank_depth, timings)
        return _Answer(hits[: request.k], found, positions,
                       bool(rerank_depth) and rerank_error is None, rerank_error)

    # ------------------------------------------------------------------- experiment log

    def _log_impression(self, impression: Impression) -> None:
        """Buffer the impression for the next flush: never waits, never fails the request."""
        if self._flusher is None:  # started here: __init__ runs before the event loop does
            self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())
        if not self.eventlog.add(impression):
            self.impressions_dropped.inc()

    async def _flush_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.flush_interval_s)
            await loop.run_in_executor(None, self.eventlog.flush)  # it keeps rows it could
            # not write, and logs why

    def __del__(self) -> None:
        # Serve calls this on a graceful shutdown (a downscale, an update): the buffer is
        # written before the replica goes
        if getattr(self, "eventlog", None) is not None:
            self.eventlog.flush()

    # serve.batch: the events of concurrent posts are written as one file (a group commit)
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.05)
    async def _commit_events(self, posts: list[list[Event]]) -> list[int]:
        events = [e for post in posts for e in post]
        await asyncio.get_running_loop().run_in_executor(None, self.eventlog.write_events,
                                                         events)
        return [len(post) for post in posts]

    @app.post("/events", response_model=EventsResponse, status_code=202,
              responses={400: {"description": "the body is not valid JSON"},
                         401: {"description": "missing or wrong API key"},
                         403: {"description": "this deployment keeps no impression log"},
                         413: {"description": "request body too large"},
                         422: {"description": "invalid events"},
                         503: {"description": "not written (storage unavailable); retry"}})
    async def events(self, body: EventsRequest) -> EventsResponse:
        """Shopper events on the products of an answer (click, add_to_cart, order), named by
        the answer's request_id: acknowledged once written to the log."""
        if self.eventlog is None:
            raise HTTPException(403, "this deployment keeps no impression log "
                                     "(AppArgs.impressions): events have nowhere to go")
        received = now()
        post = [Event(e.request_id, e.product_id, e.type, received) for e in body.events]
        try:
            accepted = await asyncio.wait_for(self._commit_events(post), timeout=self.timeout_s)
        except Exception as exc:
            log.warning("events not written: %r", exc)
            raise HTTPException(503, f"the events were not written ({type(exc).__name__}); "
                                     "retry", headers={"Retry-After": "1"}) from None
        return EventsResponse(accepted=accepted)

    def _rerank_depth(self, request: SearchRequest) -> int:
        """How many candidates this request reranks (0: none)."""
        wanted = self.rerank_default if request.rerank is None else request.rerank
        if not wanted:
            return 0
        if self.reranker is None:
            if request.rerank:
                raise HTTPException(400, "this deployment has no reranker (AppArgs.reranker); "
                                         "leave rerank unset or false")
            return 0
        return request.rerank_depth or self.rerank_depth

    async def _reranked(self, version: str, query: str, hits: list[dict[str, Any]],
                        depth: int, timings: dict[str, float]
                        ) -> tuple[list[dict[str, Any]], str | None]:
        """``hits`` with the top ``depth`` ordered by the reranker (``rerank_order``, as
        evaluation orders them); the first stage's hits and why, if the reranker fails or
        takes longer than ``rerank_timeout_s`` (never an error answer)."""
        lap = time.perf_counter()
        head, tail = hits[:depth], hits[depth:]
        try:
            scores = await asyncio.wait_for(self.reranker.score.remote(
                version, query, [h["product_id"] for h in head],
                [h.get("title") or "" for h in head]), timeout=self.rerank_timeout_s)
        except Exception as exc:  # down, too slow, or lost mid-call: answer un-reranked
            reason = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            self.rerank_fallbacks.inc(tags={"reason": reason})
            log.warning("rerank failed (%r): answering un-reranked", exc)
            _lap(timings, "rerank", lap)
            return hits, (f"the reranker did not answer ({reason}); these are the first "
                          "stage's results")
        order = rerank_order(scores)
        _lap(timings, "rerank", lap)
        return [head[i] | {"score": float(scores[i]), "first_stage_score": head[i]["score"]}
                for i in order] + tail, None

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
                            timings: dict[str, float]) -> tuple[list[dict[str, Any]], int]:
        if self.lexical is None:
            raise HTTPException(400, "this index was built without BM25: "
                                     "lexical and hybrid modes are unavailable")
        lap = time.perf_counter()
        lexical = await self._call(self.lexical.search, version, request.query, depth, filters)
        _lap(timings, "lexical", lap)
        return lexical

    def _http_error(self, mode: str, exc: BaseException, arm: str | None) -> HTTPException:
        """The one mapping of a failed request to its HTTP answer: ours (4xx) as they are; a
        shard, the encoder or BM25 unavailable (a replica down, a timeout): 503, retry."""
        if isinstance(exc, HTTPException):
            return exc
        self.requests.inc(tags={"mode": mode, "status": "503", "arm": arm or ""})
        if isinstance(exc, ShardFailure):
            return HTTPException(503, f"shards {exc.failed} of {len(self.shards)} did not "
                                      "answer; retry, or set allow_partial",
                                 headers={"Retry-After": "1"})
        log.warning("search failed: %r", exc)
        return HTTPException(503, f"service unavailable ({type(exc).__name__}); retry",
                             headers={"Retry-After": "1"})

    # ---------------------------------------------------------------------------- writes

    async def _write(self, ops: list[WriteOp]) -> list[WriteResult]:
        if self.writer is None:
            raise HTTPException(403, "this deployment is read-only: writes need a write key "
                                     "(AppArgs.write_key_env or write_key_file)")
        try:
            # no retry on another replica: there is one writer, and a retried write that had
            # been logged would be logged twice (harmless, but not what was asked)
            return await asyncio.wait_for(self.writer.write.remote(ops),
                                          timeout=self.write_timeout_s)
        except TimeoutError:
            raise HTTPException(503, f"the write did not finish in {self.write_timeout_s:g}s "
                                     "and may still be applied; retry it (a write repeated "
                                     "leaves the same catalog)",
                                headers={"Retry-After": "1"}) from None
        except Exception as exc:
            log.warning("write failed: %r", exc)
            raise HTTPException(503, f"the write was not applied ({type(exc).__name__}); "
                                     "retry", headers={"Retry-After": "1"}) from None

    @staticmethod
    def _one(result: WriteResult) -> JSONResponse:
        body = WriteResponse(**dataclasses.asdict(result))
        if result.status >= 400:
            return JSONResponse({"detail": result.error, **body.model_dump()},
                                status_code=result.status)
        return JSONResponse(body.model_dump(), status_code=result.status)

    @app.put("/products/{product_id}", response_model=WriteResponse, status_code=200,
             responses={201: {"description": "created"}, **WRITE_ERRORS})
    async def put_product(self, product: ProductFields,
                          product_id: str = Path(..., min_length=1,
                                                 max_length=MAX_PRODUCT_ID_CHARS)) -> Any:
        """Create or replace a product: embedded with the served model, searchable once a
        replica's applied_position reaches its seq."""
        ops = [WriteOp("upsert", product_id, product.model_dump())]
        return self._one((await self._write(ops))[0])

    @app.patch("/products/{product_id}", response_model=WriteResponse,
               responses={404: {"description": "no such product"}, **WRITE_ERRORS})
    async def patch_product(self, patch: ProductPatch,
                            product_id: str = Path(..., min_length=1,
                                                   max_length=MAX_PRODUCT_ID_CHARS)) -> Any:
        """Change some fields: price and in_stock without re-embedding; a text field
        re-embeds the product."""
        try:
            fields = patch.changed()
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return self._one((await self._write([WriteOp("patch", product_id, fields)]))[0])

    @app.delete("/products/{product_id}", response_model=WriteResponse,
                responses={404: {"description": "no such product"}, **WRITE_ERRORS})
    async def delete_product(self, product_id: str = Path(
            ..., min_length=1, max_length=MAX_PRODUCT_ID_CHARS)) -> Any:
        """Delete a product: it never comes back in dense, lexical or hybrid answers."""
        return self._one((await self._write([WriteOp("delete", product_id)]))[0])

    @app.post("/products:bulk", response_model=BulkResponse, responses=WRITE_ERRORS)
    async def bulk(self, request: BulkRequest) -> BulkResponse:
        """Many writes in order, each with its own status (not all-or-nothing: the valid
        items are applied, the others say why not)."""
        if len(request.items) > self.max_bulk_items:
            raise HTTPException(413, f"{len(request.items)} items: at most "
                                     f"{self.max_bulk_items} a bulk request")
        ops: list[WriteOp | WriteResult] = [write_op(item) for item in request.items]
        valid = [op for op in ops if isinstance(op, WriteOp)]
        written = iter(await self._write(valid) if valid else [])
        results = [next(written) if isinstance(op, WriteOp) else op for op in ops]
        items = [WriteResponse(**dataclasses.asdict(r)) for r in results]
        return BulkResponse(items=items, errors=sum(r.status >= 400 for r in results),
                            position=max((r.seq or 0 for r in results), default=0))

    @app.get("/products/{product_id}", response_model=ProductRecord,
             responses={401: {"description": "missing or wrong X-API-Key"},
                        403: {"description": "a read-only deployment (no catalog writer)"},
                        404: {"description": "no such product"}})
    async def get_product(self, product_id: str = Path(
            ..., min_length=1, max_length=MAX_PRODUCT_ID_CHARS)) -> ProductRecord:
        """The product as the writer holds it now (after every acknowledged write)."""
        if self.writer is None:
            raise HTTPException(403, "this deployment is read-only: it has no catalog writer")
        record, position = await self._call(self.writer.get, product_id)
        if record is None:
            raise HTTPException(404, f"no product {product_id!r}")
        return ProductRecord(product_id=product_id, record=record, position=position)

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
