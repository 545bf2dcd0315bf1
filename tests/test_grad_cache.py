"""Gradient caching (training/grad_cache.py) gives the uncached step's loss and gradients, with
dropout on (each chunk is replayed under its own random state), for both stages' objectives."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from retrieval_platform.config import from_dict
from retrieval_platform.encoder.model import DualEncoder
from retrieval_platform.training.config import TrainConfig
from retrieval_platform.training.grad_cache import backward, cached_backward
from retrieval_platform.training.objectives import stage1_objective, stage2_objective

QUERIES = ["cordless drill", "red kettle", "led bulb 60 watt", "garden hose 50 ft",
           "stainless steel kitchen sink with drain", "lamp"]
PRODUCTS = ["18v cordless drill with two batteries and a case", "electric kettle red 1.7 l",
            "led light bulb 60w equivalent soft white", "garden hose", "kitchen sink",
            "table lamp with linen shade", "hammer", "paint roller 9 inch"]


def _model() -> DualEncoder:
    torch.manual_seed(0)
    model = DualEncoder.from_pretrained("tiny")
    for layer in model.backbone.layers:  # dropout on: the replay must give the same masks
        layer.self_attn.attention_dropout = 0.3
    model.train()
    return model


def _pairs() -> dict:
    n = len(QUERIES)
    return {"query_text": QUERIES, "pos_text": PRODUCTS[:n], "pos_key": list(range(n)),
            "pos_group_key": list(range(n)), "query_pos_keys": [[i] for i in range(n)],
            "neg_texts": [[PRODUCTS[6 + i % 2]] for i in range(n)],
            "neg_keys": [[6 + i % 2] for i in range(n)],
            "neg_group_keys": [[6 + i % 2] for i in range(n)]}


def _groups() -> dict:
    return {"query_text": QUERIES[:3],
            "cand_texts": [PRODUCTS[0:3], PRODUCTS[3:5], PRODUCTS[5:8]],
            "cand_grades": [[3.0, 2.0, 1.0], [3.0, 1.0], [2.0, 2.0, 1.0]],
            "cand_keys": [[0, 1, 2], [3, 4], [5, 6, 7]],
            "cand_group_keys": [[0, 1, 2], [3, 4], [5, 6, 7]],
            "query_pos_keys": [[0], [3], []],
            "extra_texts": [[], ["hammer"], []], "extra_keys": [[], [6], []],
            "extra_group_keys": [[], [6], []], "top_index": [0, 0, -1]}


def _gradients(model: DualEncoder, run, objective, bucket: int):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    loss, metrics = run(model, model, objective, bucket)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, metrics, grads, torch.rand(1)  # and where the random stream went on to


@pytest.mark.parametrize(("stage", "batch"), [("contrastive", _pairs), ("roar", _groups)])
def test_cached_gradients_equal_the_uncached_ones(stage, batch):
    model = _model()
    cfg = from_dict(TrainConfig, {"stage": stage, "loss": {"tau": 0.1}})
    objective_of = stage1_objective if stage == "contrastive" else stage2_objective
    loss, metrics, grads, after = _gradients(model, backward, objective_of(batch(), cfg), 2)
    loss_c, metrics_c, grads_c, after_c = _gradients(model, cached_backward,
                                                     objective_of(batch(), cfg), 2)
    assert loss.item() > 0 and len(grads) > 10
    assert_close(loss_c, loss, atol=1e-6, rtol=1e-6)
    assert metrics_c == pytest.approx(metrics, rel=1e-5, abs=1e-6)
    assert grads_c.keys() == grads.keys()
    for name, grad in grads.items():
        assert_close(grads_c[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    assert torch.equal(after_c, after)  # the random stream goes on as after the uncached step


def test_dropout_is_on_so_a_replay_without_the_saved_state_would_differ():
    """The check above is not vacuous: two passes over the same texts differ under dropout."""
    model = _model()
    a = model.embed(QUERIES, "query")
    b = model.embed(QUERIES, "query")
    assert (a - b).abs().max() > 1e-3
