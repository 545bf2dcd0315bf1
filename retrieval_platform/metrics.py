"""Retrieval metrics (METHOD.md "Metrics"): plain functions on ranked ids and graded judgments.

- NDCG@k with graded gains from the dataset's gain map (ESCI: Exact 1.0, Substitute 0.1,
  Complement 0.01, Irrelevant 0; numeric scales: (r − r_min)/(r_max − r_min)); unjudged retrieved
  products have gain 0; the ideal ranking is over the query's judged products. Linear gains,
  DCG = Σ gain_i / log2(i + 1), as trec_eval's ndcg_cut.
- Recall@k of the top-grade products, MRR@k of the first top-grade product (queries without a
  top-grade product are left out of both averages).
- Grade-order accuracy: over all pairs of one query's judged products with different grades, the
  share that the model scores in the right order (ties count one half).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

Judged = Mapping[str, float]  # product_id -> grade, for one query


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


def grade_order_pairs(scores: Mapping[str, float], judged: Judged) -> tuple[float, int]:
    """(correctly ordered pairs, ties counting 0.5; number of pairs with different grades)."""
    ids = [p for p in judged if p in scores]
    g = np.asarray([judged[p] for p in ids], np.float64)
    s = np.asarray([scores[p] for p in ids], np.float64)
    dg = np.sign(g[:, None] - g[None, :])  # (n, n)
    ds = np.sign(s[:, None] - s[None, :])  # (n, n)
    upper = np.triu(np.ones_like(dg, dtype=bool), 1) & (dg != 0)
    total = int(upper.sum())
    correct = float((dg[upper] == ds[upper]).sum() + 0.5 * (ds[upper] == 0).sum())
    return correct, total


def evaluate_rankings(
    rankings: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Judged],
    *,
    gain: Callable[[np.ndarray], np.ndarray],
    top_threshold: float,
    judged_scores: Mapping[str, Mapping[str, float]] | None = None,
    ndcg_k: int = 10,
    recall_ks: Sequence[int] = (10, 100),
    mrr_k: int = 10,
) -> dict[str, float]:
    """Mean metrics over the queries of ``qrels`` (a query with no ranking counts as empty)."""
    ndcg, recalls, mrr = [], {k: [] for k in recall_ks}, []
    correct, pairs = 0.0, 0
    for qid, judged in qrels.items():
        ranked = list(rankings.get(qid, ()))
        ndcg.append(ndcg_at_k(ranked, judged, gain, ndcg_k))
        top = {p for p, g in judged.items() if g >= top_threshold}
        if top:
            for k in recall_ks:
                recalls[k].append(recall_at_k(ranked, top, k))
            mrr.append(mrr_at_k(ranked, top, mrr_k))
        if judged_scores is not None and qid in judged_scores:
            c, t = grade_order_pairs(judged_scores[qid], judged)
            correct, pairs = correct + c, pairs + t
    out = {f"ndcg@{ndcg_k}": _mean(ndcg)}
    out |= {f"recall@{k}": _mean(v) for k, v in recalls.items()}
    out[f"mrr@{mrr_k}"] = _mean(mrr)
    if judged_scores is not None:
        out["grade_order_accuracy"] = correct / pairs if pairs else float("nan")
    out["queries"] = float(len(qrels))
    return out


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")
