"""Both training stages on Ray Train with the tiny backbone, hard-negative mining, evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.catalog.prepare import PrepareConfig, prepare_catalog
from retrieval_platform.config import from_dict
from retrieval_platform.encoder.model import DualEncoder, model_info, resolve_model_folder
from retrieval_platform.evaluation.run import EvaluateConfig, evaluate
from retrieval_platform.training.config import TrainConfig
from retrieval_platform.training.examples import (
    contrastive_examples,
    key64,
    roar_examples,
    sample_negatives,
)
from retrieval_platform.training.grad_cache import loss_with_graph
from retrieval_platform.training.loop import CpuTimes, cpu_shares
from retrieval_platform.training.mining import MineConfig, mine_negatives
from retrieval_platform.training.objectives import stage1_objective
from retrieval_platform.training.trainer import train
from tests.chaos import train_with_a_worker_killed

SMALL = {"embed": {"actors": 1, "cpus_per_actor": 0.5, "batch_size": 128}}


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "syn"
    prepare_catalog(from_dict(PrepareConfig, {"source": {"num_products": 600, "seed": 1},
                                              "output_dir": str(out)}))
    return out


def _cfg(prepared: Path, tmp: Path, name: str, stage: str = "contrastive",
         **over) -> TrainConfig:
    data = {
        "stage": stage,
        "model": {"init": "tiny"},
        "data": {"prepared_dir": str(prepared)},
        "optim": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "run": {"name": name, "storage_path": str(tmp / "runs"), "checkpoint_every": 2,
                "log_every": 1, "max_failures": 1},
        "output_dir": str(tmp / name),
    }
    for key, value in over.items():
        section, field = key.split("__")
        data.setdefault(section, {})[field] = value
    return from_dict(TrainConfig, data)


def _weights(folder) -> dict[str, torch.Tensor]:
    return DualEncoder.from_pretrained(folder).backbone.state_dict()


def _changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_mining_keeps_positives_and_variants_out(prepared, tmp_path):
    stats = mine_negatives(from_dict(MineConfig, {
        "prepared_dir": str(prepared), "model": "tiny", "depth": 30, "keep": 5, "skip_top": 2,
        "output_path": str(tmp_path / "neg.parquet"), **SMALL}))
    assert stats["queries"] > 0 and stats["negatives"] > 0
    import pyarrow.parquet as pq

    negatives = pq.read_table(tmp_path / "neg.parquet").to_pylist()
    ds = PreparedDataset(prepared)
    products = ds.products(["product_id", "variant_group"])
    group = dict(zip(products["product_id"].to_pylist(), products["variant_group"].to_pylist(),
                     strict=True))
    judged = ds.judgments("train").to_pylist()
    for row in negatives:
        pos = {j["product_id"] for j in judged
               if j["query_id"] == row["query_id"] and j["grade"] >= ds.scale.positive_threshold}
        above_lowest = {j["product_id"] for j in judged
                        if j["query_id"] == row["query_id"] and j["grade"] > ds.scale.min_grade}
        assert not above_lowest & set(row["negative_ids"])
        assert not {group[p] for p in pos} & {group[n] for n in row["negative_ids"]}
        assert len(row["negative_ids"]) <= 5
        assert row["negative_scores"] == sorted(row["negative_scores"], reverse=True)
    examples = contrastive_examples(ds, hard_negatives=3,
                                    negatives_path=str(tmp_path / "neg.parquet"))
    assert all(len(n) >= 3 for n in examples["neg_pool_texts"].to_pylist())
    # The loop draws 3 of each pool, afresh each epoch.
    first = sample_negatives(examples.slice(0, 8).to_pydict(), 3, np.random.default_rng(0))
    again = sample_negatives(examples.slice(0, 8).to_pydict(), 3, np.random.default_rng(1))
    assert all(len(n) == 3 for n in first["neg_texts"])
    assert first["neg_keys"] != again["neg_keys"]


def test_stage1_mask_excludes_variant_group_duplicates(prepared):
    """Two pairs whose positives are variants of one family: each positive is the other query's
    same-group candidate, so it is masked (no gradient, loss as if it were absent)."""
    ds = PreparedDataset(prepared)
    products = ds.products(["product_id", "text", "variant_group"]).to_pandas()
    family = products.groupby("variant_group").filter(lambda g: len(g) >= 2)
    a, b = family.iloc[0], family.iloc[1]
    assert a.variant_group == b.variant_group
    model = DualEncoder.from_pretrained("tiny")
    cfg = from_dict(TrainConfig, {"loss": {"margin": None, "label_rule": False}})
    batch = {"query_text": ["query one", "query two"], "pos_text": [a.text, b.text],
             "pos_key": [key64(a.product_id), key64(b.product_id)],
             "pos_group_key": [key64(a.variant_group)] * 2, "query_pos_keys": [[], []],
             "neg_texts": [[], []], "neg_keys": [[], []], "neg_group_keys": [[], []]}
    loss, metrics = loss_with_graph(model, model, stage1_objective(batch, cfg), 0)
    assert metrics["masked_fraction"] == 1.0  # both off-diagonal candidates are variants
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # nothing left to push away
    cfg.loss.catalog_rule = False
    loss, metrics = loss_with_graph(model, model, stage1_objective(batch, cfg), 0)
    assert metrics["masked_fraction"] == 0.0 and loss.item() > 0


@pytest.fixture(scope="module")
def stage1(prepared, tmp_path_factory):
    """A 4-step stage-1 run of the tiny model on Ray Train (2 workers, a hard negative each),
    with the weights it started from."""
    tmp = tmp_path_factory.mktemp("stage1")
    init = _weights(resolve_model_folder("tiny"))
    return tmp, init, train(_cfg(prepared, tmp, "s1", data__hard_negatives=1))


def test_stage1_trains_and_records_what_it_started_from(stage1):
    _, init, s1 = stage1
    assert s1.metrics["step"] == 4 and s1.metrics["resumed_from_step"] == 0
    assert s1.metrics["epoch"] == 0 and s1.metrics["lr"] == pytest.approx(1e-3 * 1 / 3)
    assert _changed(init, _weights(s1.model_dir))  # training moved the weights
    info = model_info(s1.model_dir)
    assert info["metadata"]["stage"] == "contrastive" and info["metadata"]["step"] == 4
    assert info["metadata"]["matryoshka_dims"] == [64]  # the full dimension only
    # one id for weights: the starting model's weights checksum, as model folders name it
    assert info["metadata"]["init_model_id"] == model_info(resolve_model_folder("tiny"))[
        "model_id"]


def test_stage1_is_tracked_in_mlflow_step_by_step(stage1):
    from mlflow.tracking import MlflowClient

    _, _, s1 = stage1
    client = MlflowClient()  # the session's store ($MLFLOW_TRACKING_URI, conftest)
    exp = client.get_experiment_by_name("train-contrastive")
    [run] = client.search_runs([exp.experiment_id], f"tags.model_dir = '{s1.model_dir}'")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "lr")]
    assert lrs == pytest.approx([1e-3, 1e-3, 2e-3 / 3, 1e-3 / 3])  # lr_at: warm-up 1 of 4
    assert run.data.params["optim.max_steps"] == "4" and "in_batch_accuracy" in run.data.metrics
    if Path("/proc/stat").exists():  # the host's shares beside the throughput (Linux)
        assert 0 <= run.data.metrics["cpu_steal"] < 1 and 0 < run.data.metrics["cpu_busy"] <= 1


def test_cpu_shares_are_the_windows_steal_and_busy_ticks_over_all_ticks():
    start = CpuTimes(busy=100, steal=10, total=400)
    end = CpuTimes(busy=160, steal=40, total=500)  # 100 ticks: 60 busy, 30 stolen, 10 idle
    assert cpu_shares(start, end) == pytest.approx({"cpu_steal": 0.3, "cpu_busy": 0.6})
    assert cpu_shares(None, end) == {} and cpu_shares(end, end) == {}


def test_a_rerun_under_the_same_name_resumes(stage1, prepared):
    tmp, _, _ = stage1
    again = train(_cfg(prepared, tmp, "s1", optim__max_steps=6, data__hard_negatives=1))
    assert again.metrics["resumed_from_step"] == 4 and again.metrics["step"] == 6
    assert model_info(again.model_dir)["metadata"]["step"] == 6


def test_both_stages_train_with_gradient_caching_on_two_workers(stage1, prepared, tmp_path):
    """optim.grad_cache under DDP: chunks of 2 texts (workers' chunk counts differ in stage 2),
    every chunk but the last inside no_sync; the run trains and finishes (tests/
    test_grad_cache.py holds the gradients to the uncached ones)."""
    _, init, s1 = stage1
    cached = train(_cfg(prepared, tmp_path, "gc1", data__hard_negatives=1,
                        optim__grad_cache=True, optim__length_bucket=2, optim__max_steps=2))
    assert cached.metrics["step"] == 2 and math.isfinite(cached.metrics["loss"])
    assert _changed(init, _weights(cached.model_dir))
    s2 = train(_cfg(prepared, tmp_path, "gc2", "roar", model__init=s1.model_dir,
                    optim__grad_cache=True, optim__length_bucket=2, optim__max_steps=2))
    assert s2.metrics["step"] == 2 and math.isfinite(s2.metrics["loss"])


def test_stage2_starts_from_stage1s_model(stage1, prepared, tmp_path):
    """With a vanishing learning rate stage 2 stays at stage 1's weights: it loaded them."""
    _, _, s1 = stage1
    s1_weights = _weights(s1.model_dir)
    s2 = train(_cfg(prepared, tmp_path, "s2", "roar", model__init=str(s1.model_dir),
                    optim__lr=1e-12, optim__max_steps=2))
    meta = model_info(s2.model_dir)["metadata"]
    assert meta["stage"] == "roar" and meta["init"] == str(s1.model_dir) and meta["step"] == 2
    assert meta["init_model_id"] == model_info(s1.model_dir)["model_id"]
    s2_weights = _weights(s2.model_dir)
    for k in s2_weights:
        torch.testing.assert_close(s2_weights[k], s1_weights[k], atol=1e-6, rtol=0)
    assert {"align_loss", "contrastive_loss", "loss"} <= set(s2.metrics)


def test_evaluation_reports_every_system_and_fills_the_model_card(stage1, prepared, tmp_path):
    _, _, s1 = stage1
    report = evaluate(from_dict(EvaluateConfig, {
        "prepared_dir": str(prepared), "split": "dev",
        "models": {"zero_shot": "tiny", "stage1": str(s1.model_dir)}, "hybrid": ["stage1"],
        "fusions": [{"method": "rrf"}, {"method": "convex", "dense_weight": 0.6}],
        "dims": [32], "query_precisions": ["int8"],
        "output_dir": str(tmp_path / "report"), **SMALL}))
    assert list(report["results"]) == [
        "zero_shot", "zero_shot@32", "zero_shot[q:int8]", "stage1", "stage1@32",
        "stage1[q:int8]", "bm25", "hybrid(stage1+bm25)", "hybrid(stage1+bm25,convex0.6)"]
    dev = PreparedDataset(prepared).qrels("dev")
    assert report["queries"] == len(dev) and report["products"] == 600 and report["full_corpus"]
    for name, m in report["results"].items():  # each mean is that of its per-query values
        ndcgs = [v["ndcg@10"] for v in report["per_query"][name].values()
                 if not math.isnan(v["ndcg@10"])]
        assert m["ndcg@10"] == pytest.approx(sum(ndcgs) / len(ndcgs))
    for file in ("report.md", "report.json", "report.png", "training.png"):
        assert (tmp_path / "report" / file).stat().st_size > 0
    bm25 = report["results"]["bm25"]["ndcg@10"]
    assert f"| bm25 | {bm25:.4f} |" in (tmp_path / "report" / "report.md").read_text()
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["gain_map"].startswith("ESCI gains")
    # the model card of a trained folder: training written by training, metrics by evaluation
    card = (Path(s1.model_dir) / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers")
    assert "## Training" in card and "false-negative margin mask" in card
    ndcg = report["results"]["stage1"]["ndcg@10"]
    assert "split **dev**" in card and f"| ndcg@10 | {ndcg:.4f} |" in card


def test_stage2_examples_hold_graded_groups(prepared):
    table = roar_examples(PreparedDataset(prepared), max_candidates=6)
    for grades in table["cand_grades"].to_pylist():
        assert len(set(grades)) >= 2 and len(grades) <= 6
        assert grades == sorted(grades, reverse=True)


def test_stage2_grade_bins_group_grades_by_bin(prepared):
    """One edge at the positive threshold: two groups (below 0, at or above 1), every query
    keeps both, and its first candidate, a positive, is L₁'s positive."""
    ds = PreparedDataset(prepared)
    table = roar_examples(ds, max_candidates=6, grade_bins=[ds.scale.positive_threshold])
    assert table.num_rows > 0
    for grades, top in zip(table["cand_grades"].to_pylist(), table["top_index"].to_pylist(),
                           strict=True):
        assert set(grades) == {0.0, 1.0} and grades == sorted(grades, reverse=True)
        assert top == 0
    unbinned = roar_examples(ds, max_candidates=6)
    assert table.num_rows <= unbinned.num_rows  # queries whose grades share one bin drop out


def test_a_worker_that_dies_is_replaced_and_training_resumes(prepared, tmp_path):
    cfg = _cfg(prepared, tmp_path, "faulty", optim__max_steps=400, run__checkpoint_every=20,
               run__log_every=20, optim__batch_size=8)
    result, killed = train_with_a_worker_killed(cfg)
    assert killed is not None, "the run finished before a worker could be killed"
    assert result.metrics["step"] == 400
    assert result.metrics["resumed_from_step"] >= 20  # restarted from a checkpoint, not from 0
    assert np.isfinite(result.metrics["loss"])


def test_lora_trains_adapters_only_and_exports_a_plain_merged_folder(prepared, tmp_path):
    init = _weights(resolve_model_folder("tiny"))
    cfg = _cfg(prepared, tmp_path, "lora", optim__max_steps=3, optim__lr=1e-2,
               model__lora={"rank": 4, "alpha": 8, "dropout": 0.0})
    result = train(cfg)
    folder = Path(result.model_dir)
    assert not list(folder.glob("adapter_*"))  # merged: no peft files, a plain HF folder
    trained = _weights(folder)
    assert set(trained) == set(init)  # the same keys: no lora_A / lora_B left
    changed = {k for k in init if not torch.equal(init[k], trained[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed)  # only adapted matrices
    assert "embed_tokens.weight" not in changed


def test_a_stage_job_refuses_a_config_of_the_other_stage(tmp_path):
    """The config's ``stage`` is the one source of truth: the ROAR job does not retarget a
    stage-1 config, it says which job runs it."""
    from retrieval_platform.errors import PlatformError
    from retrieval_platform.training.trainer import stage_job

    cfg = from_dict(TrainConfig, {"stage": "contrastive", "output_dir": str(tmp_path / "m")})
    with pytest.raises(PlatformError, match=r"run it with train_jobs\.contrastive"):
        stage_job("roar")(cfg)


def test_sampled_corpus_keeps_every_judged_product(prepared):
    from retrieval_platform.evaluation.run import corpus

    ds = PreparedDataset(prepared)
    qrels = ds.qrels("dev")
    judged = {p for j in qrels.values() for p in j}
    sample = corpus(ds, qrels, len(judged) + 50, seed=3)
    ids = sample["product_id"].to_pylist()
    assert len(ids) == len(set(ids)) == len(judged) + 50 and judged <= set(ids)
    assert ids == corpus(ds, qrels, len(judged) + 50, seed=3)["product_id"].to_pylist()
    assert corpus(ds, qrels, None, seed=3).num_rows == ds.products().num_rows
