"""The cross-encoder reranker: its loss on hand-worked values, the model folder (our scores equal
sentence-transformers'), its training examples, training on Ray Train, and reranked systems in
the evaluation."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.catalog.prepare import PrepareConfig, prepare_catalog
from retrieval_platform.config import from_dict
from retrieval_platform.encoder.backbones import build_tiny_backbone
from retrieval_platform.encoder.model import DualEncoder, ModelLoadError
from retrieval_platform.index.bm25 import BM25Retriever
from retrieval_platform.losses.graded_listwise import graded_listwise_loss
from retrieval_platform.metrics import per_query_metrics
from retrieval_platform.reranker.model import CrossEncoder, reranker_info
from retrieval_platform.reranker.scoring import rerank_order, score_candidates
from retrieval_platform.reranker.training import RerankConfig, rerank_examples, train_reranker

PAIRS = [("red running shoes", "Nike red running shoe for men, size 10"),
         ("stainless kettle", "Stainless steel electric kettle 1.7 l"),
         ("drill", "Cordless drill 18V with two batteries and a case"),
         ("a", "b")]


# ----------------------------------------------------------------------------- the loss


def test_listwise_loss_on_hand_worked_values():
    # targets softmax([1, 0]) against uniform scores: -(t1 + t2) log 1/2 = ln 2
    loss = graded_listwise_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]),
                                torch.tensor([[True, True]]), target_tau=1.0)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    # equal gains: uniform targets over the two real entries (the padded one takes nothing):
    # -(1/2)(log σ-ish terms) = (1/2)[ln(e² + 1) - 2 + ln(e² + 1)]
    loss = graded_listwise_loss(torch.tensor([[2.0, 0.0, 9.0]]), torch.tensor([[0.0, 0.0, 5.0]]),
                                torch.tensor([[True, True, False]]))
    assert float(loss) == pytest.approx(math.log(math.e ** 2 + 1) - 1.0, abs=1e-6)


def test_listwise_loss_averages_rows_and_skips_those_with_one_entry():
    scores = torch.tensor([[0.0, 0.0], [3.0, 1.0]])
    gains = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    one = torch.tensor([[True, True], [True, False]])
    assert float(graded_listwise_loss(scores, gains, one, 1.0)) == pytest.approx(math.log(2))
    nothing = graded_listwise_loss(scores.requires_grad_(), gains,
                                   torch.tensor([[True, False], [False, True]]))
    assert float(nothing.detach()) == 0.0
    nothing.backward()  # a graph, so that every DDP worker back-propagates
    assert torch.equal(scores.grad, torch.zeros_like(scores))


def test_listwise_loss_pushes_the_better_graded_product_up():
    scores = torch.zeros((1, 3), requires_grad=True)
    loss = graded_listwise_loss(scores, torch.tensor([[1.0, 0.5, 0.0]]),
                                torch.ones((1, 3), dtype=torch.bool), target_tau=0.2)
    loss.backward()
    grad = scores.grad[0]
    assert grad[0] < 0 < grad[2]  # descent raises the best, lowers the worst
    assert grad[0] < grad[1] < grad[2]
    with pytest.raises(ValueError, match="target_tau"):
        graded_listwise_loss(scores, scores, torch.ones((1, 3), dtype=torch.bool), 0.0)


# ----------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def tiny_reranker(tmp_path_factory) -> Path:
    """A tiny cross-encoder folder: the tiny decoder with a fresh (seeded) score head."""
    root = tmp_path_factory.mktemp("reranker")
    build_tiny_backbone(root / "backbone", seed=3)
    torch.manual_seed(0)
    model = CrossEncoder.from_pretrained(root / "backbone", max_length=48)
    return model.save(root / "reranker", {"test": True})


def test_scores_survive_a_save_and_do_not_depend_on_batching(tiny_reranker, tmp_path):
    model = CrossEncoder.from_pretrained(tiny_reranker)
    queries, products = [q for q, _ in PAIRS], [p for _, p in PAIRS]
    together = model.score(queries, products, batch_size=3)  # chunks sorted by length
    alone = np.array([model.score([q], [p])[0] for q, p in PAIRS])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert len(set(np.round(together, 5))) == len(PAIRS)  # a real function of the text
    again = CrossEncoder.from_pretrained(model.save(tmp_path / "copy"))
    np.testing.assert_allclose(again.score(queries, products), together, atol=1e-6)
    np.testing.assert_allclose(model.rerank("drill", products), model.score(["drill"] * 4,
                                                                            products))


@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None,
                    reason="sentence-transformers not installed")
def test_sentence_transformers_cross_encoder_loads_the_folder_and_agrees(tiny_reranker):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    ours = CrossEncoder.from_pretrained(tiny_reranker).score([q for q, _ in PAIRS],
                                                             [p for _, p in PAIRS])
    theirs = STCrossEncoder(str(tiny_reranker)).predict(PAIRS)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)


def test_a_tampered_or_foreign_folder_is_refused(tiny_reranker, tmp_path):
    import shutil

    copy = Path(shutil.copytree(tiny_reranker, tmp_path / "copy"))
    with (copy / "model.safetensors").open("r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(ModelLoadError, match="sha256"):
        CrossEncoder.from_pretrained(copy)
    (copy / "retrieval_platform_reranker.json").unlink()
    with pytest.raises(ModelLoadError, match="not a reranker folder"):
        reranker_info(copy)


def test_num_layers_cuts_the_model_and_the_folder_says_so(tiny_reranker, tmp_path):
    cut = CrossEncoder.from_pretrained(tiny_reranker, num_layers=1)
    assert len(cut.backbone.base_model.layers) == 1
    folder = cut.save(tmp_path / "cut")
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 1
    again = CrossEncoder.from_pretrained(folder)
    np.testing.assert_allclose(again.score(["drill"], ["cordless drill"]),
                               cut.score(["drill"], ["cordless drill"]), atol=1e-6)


def test_rerank_order_is_by_score_with_ties_in_first_stage_order():
    assert rerank_order([0.1, 0.9, 0.5, 0.9]) == [1, 3, 2, 0]
    assert rerank_order([]) == []


def test_score_candidates_scores_each_pair_once_and_as_the_model_does(tiny_reranker):
    model = CrossEncoder.from_pretrained(tiny_reranker)
    text = {"p1": "red shoe", "p2": "steel kettle", "p3": "drill"}
    found = score_candidates(model, {"q1": "shoes", "q2": "kettle"},
                             {"q1": ["p1", "p2", "p1"], "q2": ["p3"]}, text)
    assert set(found["q1"]) == {"p1", "p2"} and set(found["q2"]) == {"p3"}
    assert found["q1"]["p2"] == pytest.approx(float(model.score(["shoes"], ["steel kettle"])[0]),
                                              abs=1e-5)


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rerank-data")
    prepare_catalog(from_dict(PrepareConfig, {"source": {"num_products": 300, "seed": 5},
                                              "output_dir": str(root / "data")}))
    return root / "data"


def test_training_lists_hold_graded_products_and_mined_negatives(catalog, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ds = PreparedDataset(catalog)
    qrels = ds.qrels("train")
    # a negatives file naming, for every query, two judged products and three others
    ids = ds.products(["product_id"])["product_id"].to_pylist()
    rows = {"query_id": [], "negative_ids": [], "negative_scores": []}
    for q, judged in qrels.items():
        negatives = list(judged)[:2] + [p for p in ids if p not in judged][:3]
        rows["query_id"].append(q)
        rows["negative_ids"].append(negatives)
        rows["negative_scores"].append([0.0] * len(negatives))
    pq.write_table(pa.table(rows), tmp_path / "negatives.parquet")
    table = rerank_examples(ds, list_size=6, negatives_path=str(tmp_path / "negatives.parquet"),
                            mined_per_query=2)
    scale = ds.scale
    low = float(scale.gain(scale.min_grade))
    for row in table.to_pylist():
        judged = qrels[row["query_id"]]
        assert 2 <= len(row["cand_ids"]) == len(row["cand_texts"]) <= 6
        assert len(set(row["cand_gains"])) >= 2
        mined = row["cand_ids"][-2:]
        assert not set(mined) & set(judged)  # judged "negatives" were left out
        assert row["cand_gains"][-2:] == [low, low]
        for p, g in zip(row["cand_ids"][:-2], row["cand_gains"][:-2], strict=True):
            assert float(scale.gain(judged[p])) == pytest.approx(g)  # the grade's NDCG gain
    assert table.num_rows > 0


def test_the_reranker_trains_on_two_workers_resumes_and_loads(ray_local, catalog, tmp_path):
    build_tiny_backbone(tmp_path / "backbone", seed=1)
    torch.manual_seed(0)
    init = CrossEncoder.from_pretrained(tmp_path / "backbone", max_length=48).save(
        tmp_path / "init")
    cfg = from_dict(RerankConfig, {
        "model": {"init": str(init)},
        "data": {"prepared_dir": str(catalog), "list_size": 8, "mined_per_query": 0},
        "optim": {"max_steps": 6, "batch_size": 2, "warmup_steps": 1, "lr": 1e-3},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "run": {"name": "rr", "storage_path": str(tmp_path / "train"), "checkpoint_every": 3,
                "log_every": 2},
        "output_dir": str(tmp_path / "out")})
    result = train_reranker(cfg)
    assert result["metrics"]["step"] == 6
    trained = CrossEncoder.from_pretrained(result["model_dir"])
    before = CrossEncoder.from_pretrained(init)
    assert not np.allclose(trained.score(["drill"], ["cordless drill"]),
                           before.score(["drill"], ["cordless drill"]))  # it learned something
    record = json.loads((Path(result["model_dir"]) / "training.json").read_text())
    assert record["stage"] == "rerank"
    assert [h["step"] for h in record["history"]] == [2, 3, 4, 6]  # logs and checkpoints
    assert "library_name: sentence-transformers" in (Path(result["model_dir"]) /
                                                     "README.md").read_text()
    again = train_reranker(cfg)  # the same run name: resumes its finished checkpoint
    assert again["metrics"]["resumed_from_step"] == 6


def test_evaluation_reranks_each_systems_top_n_by_the_reranker(ray_local, catalog,
                                                                tiny_reranker, tmp_path):
    from retrieval_platform.evaluation.run import EvaluateConfig, evaluate

    build_tiny_backbone(tmp_path / "backbone", seed=0)
    DualEncoder.from_pretrained(tmp_path / "backbone").save(tmp_path / "dense")
    cfg = from_dict(EvaluateConfig, {
        "prepared_dir": str(catalog), "split": "dev", "models": {"dense": str(tmp_path / "dense")},
        "hybrid": ["dense"], "depth": 100, "output_dir": str(tmp_path / "report"),
        "embed": {"actors": 1, "cpus_per_actor": 0.5, "batch_size": 100},
        "rerank": {"model": str(tiny_reranker), "depths": [5, 20], "systems": ["bm25", "dense"]}})
    report = evaluate(cfg)
    assert set(report["reranked"]) == {"rerank(bm25)@5", "rerank(bm25)@20", "rerank(dense)@5",
                                       "rerank(dense)@20"}
    ds = PreparedDataset(catalog)
    products = ds.products(["product_id", "text"])
    ids, texts = products["product_id"].to_pylist(), products["text"].to_pylist()
    text_of = dict(zip(ids, texts, strict=True))
    qrels, query_text = ds.qrels("dev"), ds.query_texts("dev")
    model = CrossEncoder.from_pretrained(tiny_reranker)
    bm25 = BM25Retriever(ids, texts)
    for q in sorted(qrels)[:5]:
        first = [p for p, _ in bm25.search([query_text[q]], 100)[0]]
        scores = model.rerank(query_text[q], [text_of[p] for p in first[:5]])
        expected = [first[i] for i in rerank_order(scores)] + first[5:]
        again = per_query_metrics({q: expected}, {q: qrels[q]}, gain=ds.scale.gain,
                                  top_threshold=ds.scale.top_threshold)
        assert report["per_query"]["rerank(bm25)@5"][q]["ndcg@10"] == pytest.approx(
            again[q]["ndcg@10"])
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "Reranked by" in markdown and "| rerank(dense)@20 | dense |" in markdown
