"""A teacher's scores of each training query's candidate list, for distillation into the dual
encoder (stage 2's ``loss.distill_weight``, :mod:`retrieval_platform.losses.listwise_distillation`).

A list is a query's judged products, then its mined negatives (``negatives_path``), then the
products an index version retrieves for it (``retrieve``): the unjudged products the dense
model ranks high and that count as misses today, which a teacher can still score. Ray Data
scores the lists on an actor pool that loads the teacher once (:class:`TeacherScorer`). Two
teachers:

- ``reranker``: the platform's cross-encoder (``train_jobs.rerank``); a score is its logit.
- ``hybrid``: an index version's dense and BM25 scores of each pair, min-max normalised over
  the query's list and mixed with the version's convex weight α (``retrievers/hybrid.py``'s
  fusion, over the list instead of each side's retrieved top): α · ŝ_dense + (1 − α) · ŝ_bm25,
  in [0, 1]. A teacher of lexical evidence the dual encoder lacks, at no training cost.

The scores file is this module's: its schema (``TEACHER_SCORES_SCHEMA``: one row a pair, each
query's list in order), its writer (:func:`score_candidates`) and its reader
(:func:`read_teacher_scores`, for :mod:`retrieval_platform.training.examples`).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from retrieval_platform import storage
from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.errors import PlatformError
from retrieval_platform.retrievers.hybrid import normalise
from retrieval_platform.training.mining import read_negatives

log = logging.getLogger(__name__)

TEACHER_SCORES_SCHEMA = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("product_id", pa.string(), nullable=False),
    pa.field("score", pa.float32(), nullable=False),
])
TEACHER_METADATA_KEY = b"retrieval_platform.teacher"


@dataclass
class TeacherConfig:
    kind: Literal["reranker", "hybrid"] = "reranker"
    model: str | None = None  # reranker: its folder (train_jobs.rerank's output_dir)
    index: str | None = None  # hybrid: an index version folder built with bm25
    dense_weight: float | None = None  # hybrid: α (null: the version's convex fusion weight)
    precision: Literal["fp32", "int8"] = "fp32"  # reranker: fp32, or its int8 copy

    def __post_init__(self) -> None:
        if self.kind not in ("reranker", "hybrid"):
            raise ValueError(f"teacher.kind {self.kind!r}: reranker or hybrid")
        if self.kind == "reranker" and not self.model:
            raise ValueError("teacher.kind reranker needs teacher.model (a reranker folder)")
        if self.kind == "hybrid" and not self.index:
            raise ValueError("teacher.kind hybrid needs teacher.index (an index version)")
        if self.dense_weight is not None and not 0.0 <= self.dense_weight <= 1.0:
            raise ValueError("teacher.dense_weight must be in [0, 1]")


@dataclass
class RetrieveConfig:
    index: str  # an index version folder: LocalSearcher, the served search code
    k: int = 20  # products retrieved per query (judged and listed ones are not added twice)
    mode: Literal["dense", "lexical", "hybrid"] = "hybrid"


@dataclass
class ScoreCandidatesConfig:
    prepared_dir: str = "runs/data/synthetic"
    split: str = "train"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    negatives_path: str | None = None  # mined negatives join each list (data_jobs.mine_negatives)
    mined_per_query: int = 8
    retrieve: RetrieveConfig | None = None  # an index's top-k join each list
    max_list: int = 48  # products per list at most (judged first)
    output_path: str = "runs/teacher/synthetic.parquet"
    batch_size: int = 16  # lists per Ray Data batch
    actors: int = 2
    cpus_per_actor: float = 0.9


def candidate_lists(ds: PreparedDataset, cfg: ScoreCandidatesConfig) -> dict[str, list[str]]:
    """query id -> its list: judged products, then mined ones, then retrieved ones, each once,
    at most ``max_list``; queries of the split with no judged product are left out."""
    judged = ds.qrels(cfg.split)
    mined = read_negatives(cfg.negatives_path)
    lists = {q: list(j) + mined.get(q, [])[: cfg.mined_per_query] for q, j in judged.items()}
    if cfg.retrieve:
        from retrieval_platform.index.store import resolve_index_dir
        from retrieval_platform.serving.search import LocalSearcher

        searcher = LocalSearcher(resolve_index_dir(cfg.retrieve.index))
        text_of = ds.query_texts(cfg.split)
        for q in lists:
            lists[q] += [h["product_id"] for h in searcher.search(text_of[q], cfg.retrieve.k,
                                                                  cfg.retrieve.mode)]
    return {q: list(dict.fromkeys(ps))[: cfg.max_list] for q, ps in lists.items() if ps}


class TeacherScorer:
    """Ray Data UDF: one row a query's list (``query_text``, ``product_ids``,
    ``product_texts``) -> the same with ``scores``; loads the teacher once per actor."""

    def __init__(self, teacher: dict[str, Any], num_threads: int) -> None:
        import torch

        torch.set_num_threads(num_threads)
        self.cfg = TeacherConfig(**teacher)
        if self.cfg.kind == "reranker":
            from retrieval_platform.reranker.scoring import load_reranker_folder

            self.reranker, _ = load_reranker_folder(self.cfg.model)
        else:
            self.hybrid = HybridTeacher(self.cfg.index, self.cfg.dense_weight)

    def __call__(self, batch: pa.Table) -> pa.Table:
        queries = batch["query_text"].to_pylist()
        ids, texts = batch["product_ids"].to_pylist(), batch["product_texts"].to_pylist()
        if self.cfg.kind == "reranker":  # every pair of the batch in one scoring pass
            flat = self.reranker.score([q for q, t in zip(queries, texts, strict=True)
                                        for _ in t], [p for t in texts for p in t],
                                       precision=self.cfg.precision).tolist()
            starts = np.cumsum([0, *map(len, texts)])
            scores = [flat[a:b] for a, b in itertools.pairwise(starts)]
        else:
            scores = self.hybrid.score_lists(queries, ids)
        return batch.append_column("scores", pa.array(scores, pa.list_(pa.float32())))


class HybridTeacher:
    """An index version's convex fusion of dense and BM25 over a query's list (module doc)."""

    def __init__(self, index: str, dense_weight: float | None) -> None:
        from retrieval_platform.encoder.batch import vectors_of
        from retrieval_platform.index.build import EMBEDDINGS_FILE
        from retrieval_platform.index.store import load_bm25, load_manifest, resolve_index_dir
        from retrieval_platform.serving.search import load_encoder_for

        index = resolve_index_dir(index)
        manifest = load_manifest(index)
        if dense_weight is None and manifest.fusion.method != "convex":
            raise PlatformError(f"{index}: fused by {manifest.fusion.method}; the hybrid "
                                "teacher needs a convex weight (set teacher.dense_weight)")
        self.alpha = manifest.fusion.dense_weight if dense_weight is None else dense_weight
        self.encoder = load_encoder_for(index)
        stored = pq.read_table(storage.fetch(manifest.path, [EMBEDDINGS_FILE])
                               / EMBEDDINGS_FILE)
        xb = vectors_of(stored["embedding"])  # (n, D)
        if manifest.served_dim:  # the Matryoshka prefix the version serves, renormalised
            xb = xb[:, : manifest.served_dim]
            xb /= np.linalg.norm(xb, axis=1, keepdims=True)
        self.xb = xb
        self.row = {p: i for i, p in enumerate(stored["product_id"].to_pylist())}
        self.bm25, _ = load_bm25(index)

    def score_lists(self, queries: list[str], lists: list[list[str]]) -> list[list[float]]:
        xq = self.encoder.encode(queries, "query")  # (B, d)
        out = []
        for q, vec, ids in zip(queries, xq, lists, strict=True):
            missing = [p for p in ids if p not in self.row]
            if missing:
                raise PlatformError(f"hybrid teacher: {len(missing)} listed products are not "
                                    f"in the index (first: {missing[0]!r})")
            dense = self.xb[[self.row[p] for p in ids]] @ vec  # (L,)
            lexical = self.bm25.score(q, ids)  # (L,)
            fused = (self.alpha * normalise(dense, (dense.min(), dense.max()))
                     + (1 - self.alpha) * normalise(lexical, (lexical.min(), lexical.max())))
            out.append(np.asarray(fused, np.float32).tolist())
        return out


def score_candidates(cfg: ScoreCandidatesConfig) -> dict[str, Any]:
    """Build every list, score it with the teacher on the actor pool, publish the file."""
    started = time.perf_counter()
    ds = PreparedDataset(cfg.prepared_dir)
    lists = candidate_lists(ds, cfg)
    if not lists:
        raise PlatformError(f"{ds.location}: no {cfg.split} query has a judged product")
    products = ds.products(["product_id", "text"])
    product_text = dict(zip(products["product_id"].to_pylist(), products["text"].to_pylist(),
                            strict=True))
    text_of = ds.query_texts(cfg.split)
    qids = sorted(lists)
    rows = pa.table({"query_id": qids, "query_text": [text_of[q] for q in qids],
                     "product_ids": [lists[q] for q in qids],
                     "product_texts": [[product_text[p] for p in lists[q]] for q in qids]})
    scored = ray.data.from_arrow(rows).map_batches(
        TeacherScorer, fn_constructor_kwargs={"teacher": asdict(cfg.teacher),
                                              "num_threads": max(1, math.ceil(
                                                  cfg.cpus_per_actor))},
        batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=cfg.cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=cfg.actors))
    out: dict[str, list] = defaultdict(list)
    for table in ray.get(scored.to_arrow_refs()):
        for q, ids, scores in zip(table["query_id"].to_pylist(),
                                  table["product_ids"].to_pylist(),
                                  table["scores"].to_pylist(), strict=True):
            out["query_id"] += [q] * len(ids)
            out["product_id"] += ids
            out["score"] += scores
    teacher = {"kind": cfg.teacher.kind, "source": cfg.teacher.model or cfg.teacher.index,
               "split": cfg.split, "dataset": ds.location}
    table = pa.table(out, schema=TEACHER_SCORES_SCHEMA.with_metadata(
        {TEACHER_METADATA_KEY: json.dumps(teacher)}))
    with tempfile.TemporaryDirectory(prefix="rp-teacher-") as tmp:
        local = Path(tmp) / "teacher.parquet"
        pq.write_table(table, local)
        storage.publish_file(local, cfg.output_path)
    stats = {"queries": len(qids), "pairs": table.num_rows,
             "pairs_per_query": round(table.num_rows / len(qids), 1), **teacher,
             "output_path": storage.canonical(cfg.output_path),
             "seconds": round(time.perf_counter() - started, 1)}
    log.info("teacher scores: %s", stats)
    return stats


def read_teacher_scores(path: str | Path | None) -> dict[str, dict[str, float]]:
    """query id -> product id -> the teacher's score, each list in its stored order (empty
    without a path)."""
    if not path:
        return {}
    if not storage.exists(path):
        raise PlatformError(f"{path}: no teacher scores here (run data_jobs.score_candidates)")
    table = pq.read_table(storage.fetch_file(path))
    if not table.schema.equals(TEACHER_SCORES_SCHEMA, check_metadata=False):
        raise PlatformError(f"{path}: not a teacher scores file (columns "
                            f"{table.schema.names}; expected query_id, product_id, score)")
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for q, p, s in zip(table["query_id"].to_pylist(), table["product_id"].to_pylist(),
                       table["score"].to_pylist(), strict=True):
        if not math.isfinite(s):
            raise PlatformError(f"{path}: a non-finite score for ({q!r}, {p!r})")
        out[q][p] = s
    return dict(out)
