"""Evaluation with full-corpus retrieval (the body of ``train_jobs.evaluate``): dense models,
BM25 and hybrids on one split.

Every product of the prepared catalog is embedded (Ray Data) and searched exactly (FAISS flat),
so the numbers are those of the deployed system, not of a re-ranking of judged products.
Grade-order accuracy is computed on the judged products of each query: dense scores are cosine
similarities, BM25 scores are BM25's, hybrid scores are the served fusion's
(``retrievers.hybrid``): RRF of full-corpus ranks, or the convex mix of normalised scores, of
the top ``HYBRID_DEPTH`` of each side, as the service fuses them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from retrieval_platform import storage
from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.config import to_dict
from retrieval_platform.encoder.batch import EmbedConfig, embed_catalog
from retrieval_platform.encoder.card import record_evaluation
from retrieval_platform.encoder.model import (
    DualEncoder,
    model_info,
    model_location,
    resolve_model_folder,
)
from retrieval_platform.errors import PlatformError
from retrieval_platform.evaluation.report import write_report
from retrieval_platform.index.bm25 import BM25Retriever
from retrieval_platform.index.faiss_ops import (
    IndexParams,
    build_faiss_index,
    first_dims,
    search_index,
)
from retrieval_platform.metrics import aggregate, per_query_metrics
from retrieval_platform.reranker.scoring import (
    load_reranker_folder,
    rerank_order,
    score_candidates,
)
from retrieval_platform.retrievers import ScoredIds
from retrieval_platform.retrievers.hybrid import (
    HYBRID_DEPTH,
    Fusion,
    fuse,
    minmax_bounds,
    normalise,
)
from retrieval_platform.tracking import TrackingConfig, log_evaluation

log = logging.getLogger(__name__)


@dataclass
class RerankEvalConfig:
    """Rerank systems' top N with a cross-encoder (``train_jobs.rerank``): each one a system
    ``rerank(NAME)@N``, the reranked top N followed by the rest of NAME's list."""

    model: str = ""  # a reranker folder or storage URI
    depths: list[int] = field(default_factory=lambda: [50, 100])
    systems: list[str] = field(default_factory=list)  # whose lists (empty: every system)
    batch_size: int = 64
    precision: Literal["fp32", "bf16", "int8", "auto"] = "fp32"

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("rerank.model: name the reranker folder (train_jobs.rerank)")
        if not self.depths or min(self.depths) < 1:
            raise ValueError("rerank.depths must be one or more depths >= 1")


@dataclass
class EvaluateConfig:
    prepared_dir: str = "runs/data/synthetic"
    split: str = "dev"
    models: dict[str, str] = field(default_factory=dict)  # system name -> model folder / backbone
    bm25: bool = True
    hybrid: list[str] = field(default_factory=list)  # dense systems fused with BM25
    # each fusion of each hybrid is one system: "hybrid(NAME+bm25)" for RRF with k = 60,
    # "hybrid(NAME+bm25,convex0.3)" for convex fusion with α = 0.3, ...
    fusions: list[Fusion] = field(default_factory=lambda: [Fusion()])
    depth: int = 100  # retrieved per query and per system
    max_queries: int | None = None  # a seeded sample of the split's judged queries
    # a seeded sample of the corpus: every judged product of the evaluated queries, plus random
    # others up to this many (learning curves, quick checks); null: the full corpus
    max_products: int | None = None
    seed: int = 0
    output_dir: str = "runs/reports/synthetic"
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    query_batch_size: int = 64
    dims: list[int] = field(default_factory=list)  # also rank with the first d dims (Matryoshka)
    # ascending grade edges (stage 2's data.grade_bins): also report bin-order and mid-vs-low
    # accuracy (metrics.stage2_pairs); the top grade's AUC comes with them
    grade_bins: list[float] | None = None
    # also rank with the queries encoded at these precisions (the serving encoder's options),
    # products as embedded: systems "NAME[q:int8]", ...
    query_precisions: list[Literal["fp32", "bf16", "int8", "auto"]] = field(
        default_factory=list)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow (tracking.py)
    rerank: RerankEvalConfig | None = None  # also rerank systems' top N (a cross-encoder)

    def __post_init__(self) -> None:
        if self.rerank and max(self.rerank.depths) > self.depth:
            raise ValueError(f"rerank.depths {self.rerank.depths}: a system retrieves only "
                             f"depth={self.depth} per query")
        if self.hybrid and self.depth < HYBRID_DEPTH:  # else we would report another fusion
            raise ValueError(f"depth {self.depth}: a hybrid fuses the top {HYBRID_DEPTH} of "
                             f"each side, as the service does; set depth >= {HYBRID_DEPTH}")


@dataclass
class _Ranked:
    hits: dict[str, ScoredIds]  # query -> its top-depth (product, score), best first
    judged_scores: dict[str, dict[str, float]]
    full_ranks: dict[str, dict[str, int]]  # query -> judged product -> rank in the whole corpus
    seconds: float

    @property
    def rankings(self) -> dict[str, list[str]]:
        return {q: [p for p, _ in hits] for q, hits in self.hits.items()}


def hybrid_name(system: str, fusion: Fusion) -> str:
    suffix = "" if fusion == Fusion() else f",{fusion.label}"
    return f"hybrid({system}+bm25{suffix})"


def corpus(ds: PreparedDataset, qrels: dict[str, dict[str, float]], max_products: int | None,
           seed: int) -> pa.Table:
    """The products searched (``product_id``, ``text``): all of them, or with ``max_products``
    every judged product of ``qrels`` plus a seeded random sample of the others up to that
    many (the judged ones always count)."""
    table = ds.products(["product_id", "text"])
    if not max_products or table.num_rows <= max_products:
        return table
    ids = table["product_id"].to_numpy(zero_copy_only=False)
    judged = {p for j in qrels.values() for p in j}
    is_judged = np.isin(ids, list(judged))
    others = np.flatnonzero(~is_judged)
    extra = max(0, max_products - int(is_judged.sum()))
    rng = np.random.default_rng(seed)
    pick = rng.choice(others, min(extra, len(others)), replace=False)
    keep = np.sort(np.concatenate([np.flatnonzero(is_judged), pick]))
    return table.take(keep)


def _embed(name: str, model: str, ds: PreparedDataset, products: pa.Table, qtexts: list[str],
           cfg: EvaluateConfig) -> tuple[list[str], np.ndarray, dict[str, np.ndarray], str]:
    """Every product searched (Ray Data, the one encode path) and every query, at full
    dimension: queries at the embedding's precision (key "") and at each of
    ``cfg.query_precisions``."""
    started = time.perf_counter()
    folder = resolve_model_folder(model)
    # blocks small enough that every actor has work to the end (a sampled corpus is small)
    block = max(64, min(1024, -(-products.num_rows // (4 * cfg.embed.actors))))
    cols, xb = embed_catalog(ds.products_dataset(table=products, rows_per_block=block),
                             model, cfg.embed, ["product_id"])
    encoder = DualEncoder.from_pretrained(folder)
    xq = {key: encoder.encode(qtexts, "query", batch_size=cfg.query_batch_size,
                              precision=precision)  # (nq, d)
          for key, precision in [("", cfg.embed.precision),
                                 *[(p, p) for p in cfg.query_precisions]]}
    log.info("%s: %d products embedded in %.0fs", name, len(xb), time.perf_counter() - started)
    return cols["product_id"], xb, xq, model_info(folder)["model_id"]


def _ranked(ids: list[str], qids: list[str], qrels: dict[str, dict[str, float]],
            hits: list[ScoredIds], all_scores: Callable[[int], np.ndarray], started: float
            ) -> _Ranked:
    """One retriever's top-depth ``hits`` per query, plus every judged product's score and
    full-corpus rank from ``all_scores(query index)`` (n,), for grade-order accuracy."""
    pos = {p: i for i, p in enumerate(ids)}
    judged_scores, full_ranks = {}, {}
    for qi, qid in enumerate(qids):
        judged = [p for p in qrels[qid] if p in pos]
        scores = all_scores(qi)  # (n,)
        s = scores[[pos[p] for p in judged]]
        judged_scores[qid] = dict(zip(judged, s.tolist(), strict=True))
        full_ranks[qid] = {p: int((scores > v).sum()) + 1 for p, v in zip(judged, s,
                                                                          strict=True)}
    return _Ranked(dict(zip(qids, hits, strict=True)), judged_scores, full_ranks,
                   time.perf_counter() - started)


def _dense(ids: list[str], xb: np.ndarray, xq: np.ndarray, qids: list[str],
           qrels: dict[str, dict[str, float]], depth: int, seconds: float) -> _Ranked:
    """Exact inner-product search (FAISS flat) over every product."""
    started = time.perf_counter() - seconds  # the embedding time counts too
    D, I = search_index(build_faiss_index(xb, IndexParams()), xq, depth, IndexParams())
    hits = [[(ids[i], float(d)) for d, i in zip(D[qi], I[qi], strict=True) if i >= 0]
            for qi in range(len(qids))]
    return _ranked(ids, qids, qrels, hits, lambda qi: xb @ xq[qi], started)


def _bm25(products: pa.Table, qids: list[str], qtexts: list[str],
          qrels: dict[str, dict[str, float]], depth: int) -> _Ranked:
    """BM25 (the index's own, ``index.bm25``) over every product text searched."""
    started = time.perf_counter()
    ids = products["product_id"].to_pylist()
    bm25 = BM25Retriever(ids, products["text"].to_pylist())
    hits = [[(p, float(score)) for p, score in found] for found in bm25.search(qtexts, depth)]
    return _ranked(ids, qids, qrels, hits, lambda qi: bm25.all_scores(qtexts[qi]), started)


def _hybrid(dense: _Ranked, lexical: _Ranked, depth: int, fusion: Fusion) -> _Ranked:
    """The served fusion (``retrievers.hybrid.fuse``) of the top ``HYBRID_DEPTH`` of each list;
    judged products are scored by the same function of their full-corpus ranks (RRF) or scores
    normalised with the lists' bounds (convex), for grade-order accuracy."""
    hits, judged_scores = {}, {}
    for qid in dense.hits:
        hits[qid] = fuse(dense.hits[qid][:HYBRID_DEPTH], lexical.hits[qid][:HYBRID_DEPTH],
                         depth, fusion)
        if fusion.method == "rrf":
            judged_scores[qid] = {
                p: 1 / (fusion.rrf_k + dense.full_ranks[qid][p])
                + 1 / (fusion.rrf_k + lexical.full_ranks[qid][p])
                for p in dense.full_ranks[qid]}
        else:
            a = fusion.dense_weight
            bd = minmax_bounds(dense.hits[qid][:HYBRID_DEPTH])
            bl = minmax_bounds(lexical.hits[qid][:HYBRID_DEPTH])
            judged_scores[qid] = {
                p: a * float(normalise(s, bd))
                + (1 - a) * float(normalise(lexical.judged_scores[qid][p], bl))
                for p, s in dense.judged_scores[qid].items()}
    return _Ranked(hits, judged_scores, {}, dense.seconds + lexical.seconds)


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate every configured system; writes report.md, report.json and report.png."""
    ds = PreparedDataset(cfg.prepared_dir)
    qids, qrels = _queries(ds, cfg)
    text_of = ds.query_texts(cfg.split)
    qtexts = [text_of[q] for q in qids]
    products = corpus(ds, qrels, cfg.max_products, cfg.seed)
    unknown = [h for h in cfg.hybrid if h not in cfg.models]
    if unknown:
        raise PlatformError(f"hybrid names {unknown} are not among models {list(cfg.models)}")
    ranked, model_ids = rank_systems(cfg, ds, products, qids, qtexts, qrels)
    reranked: dict[str, dict[str, Any]] = {}
    reranker: dict[str, str] = {}
    if cfg.rerank:
        more, reranked, reranker_id = rerank_systems(
            cfg.rerank, ranked, products, dict(zip(qids, qtexts, strict=True)), qrels)
        ranked |= more
        reranker = {"path": model_location(cfg.rerank.model), "model_id": reranker_id}
    scale = ds.scale
    per_query = {
        name: per_query_metrics(r.rankings, qrels, gain=scale.gain,
                                top_threshold=scale.top_threshold, judged_scores=r.judged_scores,
                                grade_bins=cfg.grade_bins)
        for name, r in ranked.items()
    }
    results = {name: aggregate(per_query[name]) | {"seconds": round(ranked[name].seconds, 1)}
               for name in ranked}
    report = {
        "dataset": ds.location, "split": cfg.split, "queries": len(qids),
        "products": products.num_rows,
        "full_corpus": products.num_rows == ds.manifest["counts"]["products"]["accepted"],
        "gain_map": scale.describe_gains(), "top_grade": f"grade >= {scale.top_threshold:g}",
        "models": {name: {"path": model_location(m), "model_id": model_ids[name]}
                   for name, m in cfg.models.items()},
        "results": results, "config": to_dict(cfg),
        # reranked system -> its first stage and depth (report.md compares the two)
        "reranked": reranked, "reranker": reranker,
        # Per-query values, for paired bootstrap intervals (retrieval_platform.stats).
        "query_text": dict(zip(qids, qtexts, strict=True)), "per_query": per_query,
    }
    with storage.publish(cfg.output_dir, overwrite=True) as out:
        write_report(report, out)
        log_evaluation(cfg.tracking, report, out, name=Path(storage.canonical(cfg.output_dir)).name)
    for name, model in report["models"].items():  # the model cards of trained folders show it
        record_evaluation(model["path"], report, name)  # local folders (stored ones are final)
    return report


def _queries(ds: PreparedDataset, cfg: EvaluateConfig
             ) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The judged queries of the split (a seeded sample of ``max_queries``), and their qrels."""
    qrels = ds.qrels(cfg.split)
    if not qrels:
        raise PlatformError(f"{cfg.prepared_dir}: split {cfg.split!r} has no judged queries")
    qids = sorted(qrels)
    if cfg.max_queries and len(qids) > cfg.max_queries:
        rng = np.random.default_rng(cfg.seed)
        qids = sorted(rng.choice(qids, cfg.max_queries, replace=False).tolist())
    return qids, {q: qrels[q] for q in qids}


def rerank_systems(cfg: RerankEvalConfig, ranked: dict[str, _Ranked], products: pa.Table,
                   query_text: dict[str, str], qrels: dict[str, dict[str, float]]
                   ) -> tuple[dict[str, _Ranked], dict[str, dict[str, Any]], str]:
    """(every ``rerank(NAME)@N`` system, what each reranks, the reranker's id). Each
    (query, product) pair is scored once however many systems and depths retrieve it; judged
    products are scored too (the reranker's grade-order accuracy)."""
    started = time.perf_counter()
    model, model_id = load_reranker_folder(cfg.model)
    names = cfg.systems or list(ranked)
    unknown = [n for n in names if n not in ranked]
    if unknown:
        raise PlatformError(f"rerank.systems {unknown} are not among the systems evaluated "
                            f"({', '.join(ranked)})")
    text_of = dict(zip(products["product_id"].to_pylist(), products["text"].to_pylist(),
                       strict=True))
    top = max(cfg.depths)
    candidates = {q: [p for n in names for p, _ in ranked[n].hits[q][:top]]
                  + [p for p in qrels[q] if p in text_of] for q in query_text}
    scores = score_candidates(model, query_text, candidates, text_of, cfg.batch_size,
                              cfg.precision)
    log.info("reranker: %d pairs scored in %.0fs", sum(map(len, scores.values())),
             time.perf_counter() - started)
    out: dict[str, _Ranked] = {}
    what: dict[str, dict[str, Any]] = {}
    for name in names:
        for depth in cfg.depths:
            hits = {}
            for q, found in ranked[name].hits.items():
                head = found[:depth]
                order = rerank_order([scores[q][p] for p, _ in head])
                hits[q] = [(head[i][0], scores[q][head[i][0]]) for i in order] + found[depth:]
            judged = {q: {p: scores[q][p] for p in qrels[q] if p in text_of} for q in hits}
            system = f"rerank({name})@{depth}"
            out[system] = _Ranked(hits, judged, {}, ranked[name].seconds
                                  + time.perf_counter() - started)
            what[system] = {"base": name, "depth": depth}
    return out, what, model_id


def rank_systems(cfg: EvaluateConfig, ds: PreparedDataset, products: pa.Table, qids: list[str],
                 qtexts: list[str], qrels: dict[str, dict[str, float]]
                 ) -> tuple[dict[str, _Ranked], dict[str, str]]:
    """Every system's ranking of ``products`` for the queries (by name: each model, its
    Matryoshka prefixes and query precisions, BM25, each hybrid and fusion), and each model's
    id."""
    ranked: dict[str, _Ranked] = {}
    model_ids: dict[str, str] = {}
    for name, model in cfg.models.items():
        started = time.perf_counter()
        ids, xb, xqs, model_ids[name] = _embed(name, model, ds, products, qtexts, cfg)
        seconds = time.perf_counter() - started
        xq = xqs.pop("")
        ranked[name] = _dense(ids, xb, xq, qids, qrels, cfg.depth, seconds)
        for d in cfg.dims:  # the same embeddings, first d dimensions (Matryoshka)
            ranked[f"{name}@{d}"] = _dense(ids, first_dims(xb, d), first_dims(xq, d), qids,
                                           qrels, cfg.depth, seconds)
        for precision, xq_p in xqs.items():  # the same products, queries at another precision
            ranked[f"{name}[q:{precision}]"] = _dense(ids, xb, xq_p, qids, qrels, cfg.depth,
                                                      seconds)
    if cfg.bm25 or cfg.hybrid:
        lexical = _bm25(products, qids, qtexts, qrels, cfg.depth)
        if cfg.bm25:
            ranked["bm25"] = lexical
        for name in cfg.hybrid:
            for fusion in cfg.fusions:
                ranked[hybrid_name(name, fusion)] = _hybrid(ranked[name], lexical, cfg.depth,
                                                            fusion)
    return ranked, model_ids
