"""Metrics against hand-computed tables and an independent implementation (ir-measures)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from retrieval_platform.catalog.schema import ESCI, HOMEDEPOT
from retrieval_platform.metrics import (
    evaluate_rankings,
    grade_bin,
    grade_order_pairs,
    mrr_at_k,
    ndcg_at_k,
    per_query_metrics,
    recall_at_k,
    stage2_pairs,
)
from retrieval_platform.stats import paired_bootstrap

QRELS = {"q1": {"a": 3.0, "b": 2.0, "c": 0.0, "d": 3.0}}


def test_ndcg_by_hand():
    """Ranking [b, x, a] with ESCI gains: DCG = 0.1/1 + 0 + 1/log2(4) = 0.6.
    Ideal over judged [1, 1, 0.1, 0]: 1 + 1/log2(3) + 0.1/2 = 1.680930. NDCG@10 = 0.356945."""
    ndcg = ndcg_at_k(["b", "x", "a"], QRELS["q1"], ESCI.gain, 10)
    assert ndcg == pytest.approx(0.6 / (1 + 1 / math.log2(3) + 0.05), abs=1e-6)
    assert ndcg == pytest.approx(0.356945, abs=1e-6)
    assert ndcg_at_k(["a", "d", "b", "c"], QRELS["q1"], ESCI.gain, 10) == pytest.approx(1.0)
    assert ndcg_at_k([], QRELS["q1"], ESCI.gain, 10) == 0.0
    assert ndcg_at_k(["c"], {"c": 0.0}, ESCI.gain, 10) == 0.0  # nothing to find


def test_ndcg_numeric_gains():
    """Home Depot: gain = (r − 1)/2. [p2 (r=2), p1 (r=3)]: DCG = 0.5 + 1/log2 3 = 1.130930;
    ideal [1, 0.5]: 1 + 0.5/log2 3 = 1.315465; NDCG = 0.859719."""
    judged = {"p1": 3.0, "p2": 2.0}
    assert ndcg_at_k(["p2", "p1"], judged, HOMEDEPOT.gain, 10) == pytest.approx(0.859719, abs=1e-6)


def test_recall_and_mrr():
    assert recall_at_k(["x", "a", "y"], {"a", "d"}, 2) == 0.5
    assert recall_at_k(["x", "a", "d"], {"a", "d"}, 10) == 1.0
    assert mrr_at_k(["x", "y", "d"], {"a", "d"}, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(["x", "y", "d"], {"a", "d"}, 2) == 0.0


def test_grade_order_accuracy_by_hand():
    """Grades a3 b2 c0 d3: pairs with different grades: (a,b) (a,c) (b,c) (b,d) (c,d) = 5.
    Scores a .9, b .5, c .6, d .5: right (a,b) (a,c); wrong (b,c) (c,d); tie (b,d) -> 2.5/5."""
    scores = {"a": 0.9, "b": 0.5, "c": 0.6, "d": 0.5}
    assert grade_order_pairs(scores, QRELS["q1"]) == (2.5, 5)
    # Pairs at least one grade apart only: grades 3, 2, 2, 0 -> a-b, a-c, a-d, b-d, c-d.
    assert grade_order_pairs(scores, QRELS["q1"], min_gap=1.0)[1] == 5


def test_stage2_pair_metrics_by_hand():
    """Grades a3 b2 c0 d3, scores a .9, b .5, c .6, d .5 (as above).
    Bins at edges [1, 2.5]: a2 b1 c0 d2. Bin pairs = the 5 grade pairs -> 2.5/5. Mid-vs-low
    (bins differ, both below the top bin): (b, c) only, c outscores b -> 0/1.
    Top grade's AUC (grade >= 3: a, d vs b, c): (a,b) (a,c) right, (d,b) tie, (d,c) wrong -> 2.5/4.
    Edges [2.5]: a1 b0 c0 d1: bin pairs (a,b) (a,c) (b,d) (c,d) -> 2.5/4, no mid-vs-low pair."""
    scores = {"a": 0.9, "b": 0.5, "c": 0.6, "d": 0.5}
    assert grade_bin(np.array([1.0, 1.67, 2.0, 2.33, 2.5, 2.67, 3.0]), [1.8, 2.5]).tolist() == [
        0, 0, 1, 1, 2, 2, 2]
    three = stage2_pairs(scores, QRELS["q1"], [1.0, 2.5], top_threshold=3.0)
    assert (three["bin_correct"], three["bin_pairs"]) == (2.5, 5)
    assert (three["midlow_correct"], three["midlow_pairs"]) == (0.0, 1)
    assert (three["auc_correct"], three["auc_pairs"]) == (2.5, 4)
    two = stage2_pairs(scores, QRELS["q1"], [2.5], top_threshold=3.0)
    assert (two["bin_correct"], two["bin_pairs"], two["midlow_pairs"]) == (2.5, 4, 0)


def test_pair_metrics_aggregate_and_resample_as_ratios_of_sums():
    """Two queries: 1 right of 1 mid-vs-low pair, 0 of 3 -> 1/4 (not the mean of 1 and 0);
    the bootstrap difference of a system with itself is exactly 0."""
    qrels = {"q1": {"a": 2.0, "b": 1.0}, "q2": {"c": 2.0, "d": 1.0, "e": 1.5, "f": 1.0}}
    judged = {"q1": {"a": 0.9, "b": 0.1}, "q2": {"c": 0.1, "d": 0.2, "e": 0.15, "f": 0.3}}
    out = evaluate_rankings({}, qrels, gain=HOMEDEPOT.gain, top_threshold=3.0,
                            judged_scores=judged, grade_bins=[0.5, 1.75, 2.5])
    # bins: a 2, b 1, c 2, d 1, e 1, f 1; the top bin is 3, so bins 2 vs 1 are mid-vs-low:
    # (a,b) right; (c,d) (c,e) (c,f) wrong.
    assert out["mid_low_accuracy"] == pytest.approx(1 / 4)
    assert np.isnan(out["top_grade_auc"])  # no grade >= 3
    pq = per_query_metrics({}, qrels, gain=HOMEDEPOT.gain, top_threshold=3.0,
                           judged_scores=judged, grade_bins=[0.5, 1.75, 2.5])
    same = paired_bootstrap(pq, pq, "mid_low_accuracy")
    assert (same.delta, same.low, same.high, same.queries) == (0.0, 0.0, 0.0, 2)


def test_evaluate_rankings_aggregates():
    qrels = {"q1": QRELS["q1"], "q2": {"e": 0.0}}
    out = evaluate_rankings({"q1": ["a", "x", "d"], "q2": ["e"]}, qrels, gain=ESCI.gain,
                            top_threshold=3.0, judged_scores={"q1": {"a": 1, "b": 0.5}})
    # q2 has no positive: NDCG 0, left out of recall/MRR.
    ideal = 1 + 1 / math.log2(3) + 0.05
    assert out["ndcg@10"] == pytest.approx((1 + 0.5) / ideal / 2)
    assert out["recall@10"] == 1.0 and out["mrr@10"] == 1.0
    assert out["grade_order_accuracy"] == 1.0 and out["queries"] == 2


def test_ndcg_matches_ir_measures():
    ir_measures = pytest.importorskip("ir_measures")
    rng = np.random.default_rng(0)
    products = [f"p{i}" for i in range(60)]
    qrels, run, rankings = {}, {}, {}
    for q in range(25):
        judged = rng.choice(products, size=12, replace=False)
        qrels[f"q{q}"] = {p: float(rng.integers(0, 4)) for p in judged}
        ranked = list(rng.choice(products, size=30, replace=False))
        rankings[f"q{q}"] = ranked
        run[f"q{q}"] = {p: float(30 - i) for i, p in enumerate(ranked)}
    ours = evaluate_rankings(rankings, qrels, gain=ESCI.gain, top_threshold=3.0)
    # trec_eval takes integer relevance: ESCI gains x100 (NDCG does not depend on the scale).
    int_qrels = {q: {p: round(100 * ESCI.gain(g).item()) for p, g in j.items()}
                 for q, j in qrels.items()}
    theirs = ir_measures.calc_aggregate([ir_measures.nDCG @ 10], int_qrels, run)
    assert ours["ndcg@10"] == pytest.approx(theirs[ir_measures.nDCG @ 10], abs=1e-6)
    rr_qrels = {q: {p: int(g >= 3.0) for p, g in j.items()} for q, j in qrels.items()}
    has_top = {q: j for q, j in rr_qrels.items() if any(j.values())}
    rr = ir_measures.calc_aggregate([ir_measures.RR @ 10, ir_measures.R @ 10,
                                     ir_measures.AP @ 10], has_top, {q: run[q] for q in has_top})
    assert ours["mrr@10"] == pytest.approx(rr[ir_measures.RR @ 10], abs=1e-6)
    assert ours["recall@10"] == pytest.approx(rr[ir_measures.R @ 10], abs=1e-6)
    assert ours["map@10"] == pytest.approx(rr[ir_measures.AP @ 10], abs=1e-6)
