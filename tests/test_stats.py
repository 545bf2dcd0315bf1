"""The paired bootstrap that every interval in RESULTS.md rests on, and the learning-rate
schedule, against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from retrieval_platform.config import from_dict
from retrieval_platform.stats import length_stratum, paired_bootstrap
from retrieval_platform.training.config import TrainConfig
from retrieval_platform.training.loop import lr_at


def test_equal_differences_give_a_point_interval():
    a = {q: {"ndcg@10": 0.5} for q in "abc"}
    b = {q: {"ndcg@10": 0.75} for q in "abc"}
    d = paired_bootstrap(a, b, "ndcg@10")
    assert (d.delta, d.low, d.high, d.queries) == (0.25, 0.25, 0.25, 3)
    assert str(d) == "+0.2500 [+0.2500, +0.2500]"


def test_two_queries_resample_to_three_values():
    """Differences 1 and 0: a resample of two queries has mean 1 (both the first, p = 1/4),
    0 (both the second, 1/4) or 0.5: the 2.5th and 97.5th percentiles are 0 and 1. A query
    whose metric is NaN (no top-grade product) is left out."""
    a = {"q1": {"mrr@10": 0.0}, "q2": {"mrr@10": 0.5}, "q3": {"mrr@10": math.nan}}
    b = {"q1": {"mrr@10": 1.0}, "q2": {"mrr@10": 0.5}, "q3": {"mrr@10": 1.0}}
    d = paired_bootstrap(a, b, "mrr@10", samples=4000)
    assert (d.delta, d.low, d.high, d.queries) == (0.5, 0.0, 1.0, 2)


def test_grade_order_accuracy_resamples_pairs_with_their_query():
    """A ratio metric: correct pairs over pairs, numerator and denominator resampled together.
    q1: 1 → 2 correct of 2 pairs, q2: 0 → 1 of 1; all: (3 − 1) / 3. Resamples: q1 twice
    (4 − 2) / 4 = 0.5, q2 twice 1.0, mixed 2/3; q3 has no pairs and is left out."""
    def goa(correct: float, pairs: int) -> dict[str, float]:
        return {"goa_correct": correct, "goa_pairs": pairs}

    a = {"q1": goa(1, 2), "q2": goa(0, 1), "q3": goa(0, 0)}
    b = {"q1": goa(2, 2), "q2": goa(1, 1), "q3": goa(0, 0)}
    d = paired_bootstrap(a, b, "grade_order_accuracy", samples=4000)
    assert d.delta == pytest.approx(2 / 3) and (d.low, d.high, d.queries) == (0.5, 1.0, 2)


def test_no_common_query_gives_nan():
    d = paired_bootstrap({"q1": {"ndcg@10": 1.0}}, {"q2": {"ndcg@10": 1.0}}, "ndcg@10")
    assert d.queries == 0 and math.isnan(d.delta)


def test_length_strata():
    assert [length_stratum(t) for t in ("drill", "cordless drill 18v", "a b c d e")] == [
        "1-2", "3-4", "5+"]


def test_lr_warms_up_then_decays_linearly_to_zero():
    cfg = from_dict(TrainConfig, {"optim": {"lr": 1.0, "warmup_steps": 2, "max_steps": 6}})
    assert [lr_at(step, cfg) for step in range(7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    cfg = from_dict(TrainConfig, {"optim": {"lr": 2.0, "warmup_steps": 0, "max_steps": 4}})
    assert [lr_at(step, cfg) for step in range(5)] == [2.0, 1.5, 1.0, 0.5, 0.0]
