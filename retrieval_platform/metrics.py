"""Retrieval metrics (METHOD.md "Metrics"): plain functions on ranked ids and graded judgments.

- NDCG@k with graded gains from the dataset's gain map (ESCI: Exact 1.0, Substitute 0.1,
  Complement 0.01, Irrelevant 0; numeric scales: (r − r_min)/(r_max − r_min)); unjudged retrieved
  products have gain 0; the ideal ranking is over the query's judged products. Linear gains,
  DCG = Σ gain_i / log2(i + 1), as trec_eval's ndcg_cut.
- Recall@k of the top-grade products, MRR@k of the first top-grade product (queries without a
  top-grade product are left out of both averages).
- MAP@k of the top-grade products (the paper's MAP, binarised the same way).
- Grade-order accuracy: over all pairs of one query's judged products with different grades, the
  share that the model scores in the right order (ties count one half); also over the pairs
  whose grades differ by at least 1 (Home Depot's mean ratings are noisy at smaller gaps).
- What stage 2 (ROAR) targets, as pair accuracies of the same kind, with grade bins (ascending
  edges, the stage-2 ``data.grade_bins``): bin-order accuracy over pairs in different bins,
  mid-vs-low accuracy over pairs in different bins below the top bin (the pairs L₁ alone
  leaves unordered: neither is a positive), and the top grade's AUC (the paper's AUC) over
  (top-grade, lower-grade) pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Judged = Mapping[str, float]  # product_id -> grade, for one query

# Pair-accuracy metrics -> the prefix of their per-query counts (PREFIXcorrect, PREFIXpairs):
# ratios of sums, which paired bootstrap intervals resample as such (stats.py).
PAIR_METRICS = {
    "grade_order_accuracy": "goa_",
    "grade_order_accuracy_gap": "goa_gap_",
    "bin_order_accuracy": "bin_",
    "mid_low_accuracy": "midlow_",
    "top_grade_auc": "auc_",
}


def grade_bin(grade: float | np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """A grade's bin: the number of ascending ``edges`` at or below it (edges [1.8, 2.5] on a
    1–3 scale: ≤ 1.67 -> 0, 2–2.33 -> 1, ≥ 2.67 -> 2)."""
    return np.searchsorted(np.sort(np.asarray(edges, np.float64)), grade, side="right")


def dcg(gains: Sequence[float] | np.ndarray) -> float:
    g = np.asarray(gains, dtype=np.float64)
    return float((g / np.log2(np.arange(2, g.size + 2))).sum())


def ndcg_at_k(ranked: Sequence[str], judged: Judged, gain: Callable[[np.ndarray], np.ndarray],
              k: int) -> float:
    """NDCG@k of one ranked list; 0 when the query has no positive gain at all."""
    all_gains = gain(np.fromiter(judged.values(), np.float64, len(judged)))
    ideal = dcg(np.sort(all_gains)[::-1][:k])
    if ideal <= 0:
        return 0.0
    top = ranked[:k]
    is_judged = np.asarray([p in judged for p in top], dtype=bool)
    grades = np.asarray([judged.get(p, 0.0) for p in top], np.float64)
    got = np.where(is_judged, gain(grades), 0.0) if len(top) else np.zeros(0)
    return dcg(got) / ideal


def recall_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def mrr_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    for i, p in enumerate(ranked[:k]):
        if p in relevant:
            return 1.0 / (i + 1)
    return 0.0


def average_precision_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    """AP@k = Σ_{i ≤ k, rel_i} P@i / |relevant| (trec_eval's map_cut; the paper's MAP@k,
    binarised on the top grade)."""
    hits, total = 0, 0.0
    for i, p in enumerate(ranked[:k]):
        if p in relevant:
            hits += 1
            total += hits / (i + 1)
    return total / len(relevant)


def grade_order_pairs(scores: Mapping[str, float], judged: Judged,
                      min_gap: float = 0.0) -> tuple[float, int]:
    """(correctly ordered pairs, ties counting 0.5; number of pairs whose grades differ by more
    than ``min_gap``, or at all when it is 0)."""
    def at_least_min_gap(g: np.ndarray) -> np.ndarray:
        return np.abs(g[:, None] - g[None, :]) >= min_gap - 1e-9

    return ordered_pairs(scores, judged, at_least_min_gap if min_gap > 0 else None)


def ordered_pairs(scores: Mapping[str, float], judged: Judged,
                  select: Callable[[np.ndarray], np.ndarray] | None = None
                  ) -> tuple[float, int]:
    """(correctly ordered pairs, ties counting 0.5; number of pairs) over the pairs of judged
    products with different grades that ``select(grades)`` (n, n) bool keeps (None: all)."""
    ids = [p for p in judged if p in scores]
    g = np.asarray([judged[p] for p in ids], np.float64)
    s = np.asarray([scores[p] for p in ids], np.float64)
    dg = np.sign(g[:, None] - g[None, :])  # (n, n)
    ds = np.sign(s[:, None] - s[None, :])  # (n, n)
    upper = np.triu(np.ones_like(dg, dtype=bool), 1) & (dg != 0)
    if select is not None:
        upper &= select(g)
    total = int(upper.sum())
    correct = float((dg[upper] == ds[upper]).sum() + 0.5 * (ds[upper] == 0).sum())
    return correct, total


def stage2_pairs(scores: Mapping[str, float], judged: Judged, edges: Sequence[float],
                 top_threshold: float) -> dict[str, float]:
    """One query's pair counts of bin-order accuracy, mid-vs-low accuracy (bins differ, both
    below the top bin) and the top grade's AUC (grade ≥ ``top_threshold`` vs below)."""
    top_bin = len(edges)

    def bins(g: np.ndarray) -> np.ndarray:
        b = grade_bin(g, edges)
        return b[:, None] != b[None, :]

    def mid_low(g: np.ndarray) -> np.ndarray:
        b = grade_bin(g, edges)
        return (b[:, None] != b[None, :]) & (b[:, None] < top_bin) & (b[None, :] < top_bin)

    def top(g: np.ndarray) -> np.ndarray:
        t = g >= top_threshold
        return t[:, None] != t[None, :]

    out = {}
    for prefix, select in (("bin_", bins), ("midlow_", mid_low), ("auc_", top)):
        out[f"{prefix}correct"], out[f"{prefix}pairs"] = ordered_pairs(scores, judged, select)
    return out


def per_query_metrics(
    rankings: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Judged],
    *,
    gain: Callable[[np.ndarray], np.ndarray],
    top_threshold: float,
    judged_scores: Mapping[str, Mapping[str, float]] | None = None,
    ndcg_k: int = 10,
    recall_ks: Sequence[int] = (10, 100),
    mrr_k: int = 10,
    map_k: int = 10,
    goa_min_gap: float = 1.0,
    grade_bins: Sequence[float] | None = None,
) -> dict[str, dict[str, float]]:
    """Each query's metrics (the unit that paired bootstrap intervals resample). Recall, MAP and
    MRR are NaN for a query without a top-grade product; grade-order pairs come as counts
    (``goa_correct``/``goa_pairs``, and ``goa_gap_*`` for pairs at least ``goa_min_gap``
    apart), since GOA is a ratio of sums; with ``grade_bins`` also the counts of
    :func:`stage2_pairs`."""
    out: dict[str, dict[str, float]] = {}
    nan = float("nan")
    for qid, judged in qrels.items():
        ranked = list(rankings.get(qid, ()))
        top = {p for p, g in judged.items() if g >= top_threshold}
        m = {f"ndcg@{ndcg_k}": ndcg_at_k(ranked, judged, gain, ndcg_k)}
        for k in recall_ks:
            m[f"recall@{k}"] = recall_at_k(ranked, top, k) if top else nan
        m[f"map@{map_k}"] = average_precision_at_k(ranked, top, map_k) if top else nan
        m[f"mrr@{mrr_k}"] = mrr_at_k(ranked, top, mrr_k) if top else nan
        if judged_scores is not None and qid in judged_scores:
            m["goa_correct"], m["goa_pairs"] = grade_order_pairs(judged_scores[qid], judged)
            m["goa_gap_correct"], m["goa_gap_pairs"] = grade_order_pairs(
                judged_scores[qid], judged, goa_min_gap)
            if grade_bins:
                m |= stage2_pairs(judged_scores[qid], judged, grade_bins, top_threshold)
        out[qid] = m
    return out


def aggregate(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Means over queries (NaN entries left out); GOA as correct pairs over all pairs."""
    rows = list(per_query.values())
    counts = {f"{prefix}{part}" for prefix in PAIR_METRICS.values()
              for part in ("correct", "pairs")}
    keys = [k for k in (rows[0] if rows else {}) if k not in counts]
    out = {k: _mean([r[k] for r in rows if not np.isnan(r[k])]) for k in keys}
    for name, prefix in PAIR_METRICS.items():
        if any(f"{prefix}pairs" in r for r in rows):
            pairs = sum(r.get(f"{prefix}pairs", 0) for r in rows)
            correct = sum(r.get(f"{prefix}correct", 0.0) for r in rows)
            out[name] = correct / pairs if pairs else float("nan")
    out["queries"] = float(len(rows))
    return out


def evaluate_rankings(rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Judged],
                      **options: Any) -> dict[str, float]:
    """Mean metrics over the queries of ``qrels`` (a query with no ranking counts as empty);
    ``options`` are those of :func:`per_query_metrics`."""
    return aggregate(per_query_metrics(rankings, qrels, **options))


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")
