"""Distillation into the dual encoder: the teacher's scores of each training query's list
(data_jobs.score_candidates, both teachers, on real Ray Data), stage 2's examples and loss
with them, and a Ray Train stage-2 run that distils."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.config import from_dict
from retrieval_platform.encoder.model import DualEncoder
from retrieval_platform.errors import PlatformError
from retrieval_platform.index.store import load_bm25
from retrieval_platform.losses import listwise_distillation_loss
from retrieval_platform.reranker.model import CrossEncoder
from retrieval_platform.serving.search import LocalSearcher
from retrieval_platform.training.config import TrainConfig
from retrieval_platform.training.examples import key64, roar_examples
from retrieval_platform.training.objectives import GlobalCandidates, stage2_loss
from retrieval_platform.training.teacher import (
    TEACHER_SCORES_SCHEMA,
    ScoreCandidatesConfig,
    read_teacher_scores,
    score_candidates,
)
from retrieval_platform.training.trainer import train
from tests.helpers import tiny_versions

ALPHA = 0.5


@pytest.fixture(scope="module")
def catalog(ray_local, tmp_path_factory) -> Path:
    """The synthetic catalog at ``root/data``, one index version ``root/indexes/v1`` (tiny
    model seed 5, with BM25) and the model's backbone at ``root/backbone5``."""
    root = tmp_path_factory.mktemp("distil")
    tiny_versions(root, {"v1": 5}, num_products=300, num_shards=1)
    return root


def _lists(path: Path) -> dict[str, list[tuple[str, float]]]:
    table = pq.read_table(path)
    out: dict[str, list[tuple[str, float]]] = {}
    for q, p, s in zip(*(table[c].to_pylist() for c in ("query_id", "product_id", "score")),
                       strict=True):
        out.setdefault(q, []).append((p, s))
    return out


@pytest.fixture(scope="module")
def hybrid_scores(catalog) -> Path:
    out = catalog / "teacher" / "hybrid.parquet"
    stats = score_candidates(from_dict(ScoreCandidatesConfig, {
        "prepared_dir": str(catalog / "data"), "split": "train",
        "teacher": {"kind": "hybrid", "index": str(catalog / "indexes" / "v1"),
                    "dense_weight": ALPHA},
        "retrieve": {"index": str(catalog / "indexes" / "v1"), "k": 6, "mode": "hybrid"},
        "max_list": 30, "output_path": str(out), "batch_size": 8, "actors": 1,
        "cpus_per_actor": 0.5}))
    assert stats["pairs"] == pq.read_metadata(out).num_rows
    return out


def test_lists_hold_the_judged_products_first_then_the_retrieved(catalog, hybrid_scores):
    ds = PreparedDataset(catalog / "data")
    judged = ds.qrels("train")
    searcher = LocalSearcher(catalog / "indexes" / "v1")
    text_of = ds.query_texts("train")
    lists = _lists(hybrid_scores)
    assert set(lists) == set(judged)
    assert pq.read_schema(hybrid_scores).equals(TEACHER_SCORES_SCHEMA, check_metadata=False)
    for q in sorted(lists)[:20]:
        ids = [p for p, _ in lists[q]]
        assert len(ids) == len(set(ids)) <= 30
        assert ids[: len(judged[q])] == list(judged[q])
        retrieved = [h["product_id"] for h in searcher.search(text_of[q], 6, "hybrid")]
        assert ids[len(judged[q]):] == [p for p in retrieved if p not in judged[q]]


def test_the_hybrid_teacher_is_the_convex_fusion_over_each_list(catalog, hybrid_scores):
    """α · minmax(cosine) + (1 − α) · minmax(BM25) over the list, recomputed here from the
    model and the BM25 index: the teacher's numbers, not its code."""
    ds = PreparedDataset(catalog / "data")
    products = ds.products(["product_id", "text"])
    text = dict(zip(products["product_id"].to_pylist(), products["text"].to_pylist(),
                    strict=True))
    model = DualEncoder.from_pretrained(catalog / "model5")
    bm25, _ = load_bm25(catalog / "indexes" / "v1")
    text_of = ds.query_texts("train")
    lists = _lists(hybrid_scores)

    def minmax(x: np.ndarray) -> np.ndarray:
        return (x - x.min()) / (x.max() - x.min()) if x.max() > x.min() else np.ones_like(x)

    for q in sorted(lists)[:8]:
        ids = [p for p, _ in lists[q]]
        xq = model.encode([text_of[q]], "query")  # (1, d)
        xb = model.encode([text[p] for p in ids], "product")  # (L, d)
        expected = (ALPHA * minmax((xb @ xq.T)[:, 0])
                    + (1 - ALPHA) * minmax(bm25.score(text_of[q], ids)))
        np.testing.assert_allclose([s for _, s in lists[q]], expected, atol=2e-4)


def test_the_reranker_teacher_scores_are_the_cross_encoders(catalog, tmp_path):
    torch.manual_seed(0)
    folder = CrossEncoder.from_pretrained(catalog / "backbone5", max_length=48).save(
        tmp_path / "reranker", {"test": True})
    out = tmp_path / "reranker.parquet"
    score_candidates(from_dict(ScoreCandidatesConfig, {
        "prepared_dir": str(catalog / "data"), "split": "dev",
        "teacher": {"kind": "reranker", "model": str(folder)}, "output_path": str(out),
        "batch_size": 4, "actors": 1, "cpus_per_actor": 0.5}))
    ds = PreparedDataset(catalog / "data")
    products = ds.products(["product_id", "text"])
    text = dict(zip(products["product_id"].to_pylist(), products["text"].to_pylist(),
                    strict=True))
    text_of = ds.query_texts("dev")
    lists = _lists(out)
    assert {q: [p for p, _ in ps] for q, ps in lists.items()} == {
        q: list(j) for q, j in ds.qrels("dev").items()}  # no index: the judged lists only
    pairs = [(q, p, s) for q in sorted(lists) for p, s in lists[q]]
    expected = CrossEncoder.from_pretrained(folder).score([text_of[q] for q, _, _ in pairs],
                                                          [text[p] for _, p, _ in pairs])
    np.testing.assert_allclose([s for _, _, s in pairs], expected, atol=1e-4)


def test_stage2_examples_carry_the_teachers_scores_and_its_unjudged_products(
        catalog, hybrid_scores):
    ds = PreparedDataset(catalog / "data")
    teacher = read_teacher_scores(hybrid_scores)
    table = roar_examples(ds, max_candidates=6, mined_per_query=4, teacher_scores=teacher)
    plain = roar_examples(ds, max_candidates=6)
    assert "cand_teacher" in table.column_names and "cand_teacher" not in plain.column_names
    judged = {q: {key64(p) for p in j} for q, j in ds.qrels("train").items()}
    unjudged_extras = 0
    for row in table.select(["query_id", "cand_keys", "cand_teacher", "extra_keys",
                             "extra_teacher"]).to_pylist():
        scored = {key64(p): s for p, s in teacher[row["query_id"]].items()}
        for keys, scores in ((row["cand_keys"], row["cand_teacher"]),
                             (row["extra_keys"], row["extra_teacher"])):
            assert len(keys) == len(scores)
            for key, s in zip(keys, scores, strict=True):
                assert s == pytest.approx(scored[key]) if key in scored else math.isnan(s)
        extra = [k for k in row["extra_keys"] if k not in judged[row["query_id"]]]
        assert len(row["extra_keys"]) <= 4 and all(k in scored for k in extra)
        unjudged_extras += len(extra)
    assert unjudged_extras > 0  # the teacher's list reaches products the judgments do not


def test_stage2_loss_adds_lambda_times_the_listwise_kl_over_each_querys_list():
    """Eq. 7 + λ · L_KD: the same batch with λ 0 and λ 0.4 differ by 0.4 · KL, the KL of
    each query over its own list's scored entries only (q0: c0, c1; c2 unscored; q1: c3–c5),
    by hand from the two softmaxes."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.nn.functional.normalize(torch.tensor(
        [[0.8, 0.6], [0.7, 0.7], [1.0, 0.0], [0.1, 1.0], [0.5, 0.5], [0.5, -0.9]]), dim=1)
    teacher = torch.tensor([3.0, 1.0, math.nan, 2.0, 0.0, 1.0])
    batch = GlobalCandidates(
        queries=q, candidates=c, keys=torch.arange(6), groups=torch.arange(6),
        positive_keys=torch.tensor([[0], [3]]), top=torch.tensor([0, 3]),
        owner=torch.tensor([0, 0, 0, 1, 1, -1]), grade=torch.tensor([2.0, 1.0, 0.0, 2.0, 0.0, 0.0]),
        list_owner=torch.tensor([0, 0, 0, 1, 1, 1]), teacher=teacher)

    def cfg(weight: float) -> TrainConfig:
        return from_dict(TrainConfig, {"stage": "roar", "data": {"teacher_scores_path": "t"},
                                       "loss": {"tau": 0.1, "margin": 0.1, "beta": 0.5,
                                                "distill_weight": weight, "distill_tau": 0.05,
                                                "teacher_tau": 0.5}})

    base, base_metrics = stage2_loss(batch, cfg(0.0))
    loss, metrics = stage2_loss(batch, cfg(0.4))
    s = (q @ c.T).tolist()
    kl = 0.0
    for i, members in ((0, [0, 1]), (1, [3, 4, 5])):
        p_t = torch.softmax(teacher[members] / 0.5, 0)
        p_s = torch.softmax(torch.tensor([s[i][j] for j in members]) / 0.05, 0)
        kl += float((p_t * (p_t.log() - p_s.log())).sum()) / 2
    assert "distill_loss" not in base_metrics
    assert metrics["distill_loss"] == pytest.approx(kl, abs=1e-5)
    assert loss.item() == pytest.approx(base.item() + 0.4 * kl, abs=1e-5)
    in_list = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert metrics["distill_loss"] == pytest.approx(listwise_distillation_loss(
        q @ c.T, teacher.expand(2, -1), in_list, tau_student=0.05, tau_teacher=0.5).item(),
        abs=1e-6)


def test_stage2_distils_the_teacher_on_two_workers(catalog, hybrid_scores, tmp_path):
    result = train(from_dict(TrainConfig, {
        "stage": "roar", "model": {"init": "tiny"},
        "data": {"prepared_dir": str(catalog / "data"), "max_candidates": 6,
                 "mined_per_query": 4, "teacher_scores_path": str(hybrid_scores)},
        "loss": {"distill_weight": 0.5, "teacher_tau": 0.1},
        "optim": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "run": {"name": "kd", "storage_path": str(tmp_path / "runs"), "checkpoint_every": 2,
                "log_every": 1, "max_failures": 1},
        "output_dir": str(tmp_path / "kd")}))
    assert result.metrics["step"] == 2
    assert math.isfinite(result.metrics["distill_loss"]) and result.metrics["distill_loss"] > 0


def test_distillation_needs_stage_2_and_a_teacher():
    for data in ({"stage": "roar", "loss": {"distill_weight": 0.5}},
                 {"stage": "contrastive", "data": {"teacher_scores_path": "t.parquet"},
                  "loss": {"distill_weight": 0.5}}):
        with pytest.raises(ValueError, match="teacher"):
            from_dict(TrainConfig, data)
    with pytest.raises(ValueError, match=r"teacher\.index"):
        from_dict(ScoreCandidatesConfig, {"teacher": {"kind": "hybrid"}})


def test_a_scores_file_of_another_shape_or_with_a_nan_is_refused(tmp_path):
    other = tmp_path / "negatives.parquet"
    pq.write_table(pa.table({"query_id": ["q"], "negative_ids": [["p"]]}), other)
    with pytest.raises(PlatformError, match="not a teacher scores file"):
        read_teacher_scores(other)
    nan = tmp_path / "nan.parquet"
    pq.write_table(pa.table({"query_id": ["q"], "product_id": ["p"], "score": [math.nan]},
                            schema=TEACHER_SCORES_SCHEMA), nan)
    with pytest.raises(PlatformError, match="non-finite"):
        read_teacher_scores(nan)
    with pytest.raises(PlatformError, match="score_candidates"):
        read_teacher_scores(tmp_path / "missing.parquet")
