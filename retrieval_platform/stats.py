"""Paired bootstrap intervals over queries, for every difference a quality claim rests on.

Two systems evaluated on the same queries give per-query values a_q and b_q. Resampling queries
with replacement (the same resample for both systems) gives the distribution of the mean
difference; its 2.5th and 97.5th percentiles are the 95 % interval (Efron & Tibshirani, 1993;
as used for IR by Sakai, 2006). Ratio metrics (grade-order accuracy: correct pairs over pairs)
resample numerator and denominator together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from retrieval_platform.metrics import PAIR_METRICS


@dataclass(frozen=True)
class Difference:
    delta: float  # metric(b) − metric(a) on all queries
    low: float  # 95 % interval (percentile bootstrap)
    high: float
    queries: int

    def __str__(self) -> str:
        return f"{self.delta:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def paired_bootstrap(
    a: Mapping[str, Mapping[str, float]],
    b: Mapping[str, Mapping[str, float]],
    metric: str,
    *,
    queries: Sequence[str] | None = None,
    samples: int = 2000,
    seed: int = 0,
) -> Difference:
    """The difference b − a of ``metric`` with its 95 % paired bootstrap interval.

    ``a`` and ``b`` map query id -> per-query metrics (``metrics.per_query_metrics``). For
    the pair-accuracy metrics (``metrics.PAIR_METRICS``) the per-query pair counts are used;
    otherwise queries where the metric is NaN (no top-grade product) are left out.
    """
    qids = [q for q in (queries if queries is not None else a) if q in a and q in b]
    ratio = PAIR_METRICS.get(metric)
    if ratio:
        num = np.array([[a[q][f"{ratio}correct"], b[q][f"{ratio}correct"]] for q in qids],
                       dtype=np.float64).reshape(-1, 2)  # (n, 2), even for no query
        den = np.array([a[q][f"{ratio}pairs"] for q in qids], dtype=np.float64)
        keep = den > 0
        num, den = num[keep], den[keep]

        def stat(idx: np.ndarray) -> np.ndarray:
            d = den[idx].sum(axis=-1)
            return (num[idx, 1].sum(axis=-1) - num[idx, 0].sum(axis=-1)) / d
        n = len(den)
    else:
        pairs = np.array([[a[q][metric], b[q][metric]] for q in qids],
                         dtype=np.float64).reshape(-1, 2)  # (n, 2), even for no query
        pairs = pairs[~np.isnan(pairs).any(axis=1)]
        diff = pairs[:, 1] - pairs[:, 0] if len(pairs) else np.zeros(0)

        def stat(idx: np.ndarray) -> np.ndarray:
            return diff[idx].mean(axis=-1)
        n = len(diff)
    if n == 0:
        nan = float("nan")
        return Difference(nan, nan, nan, 0)
    rng = np.random.default_rng(seed)
    boot = stat(rng.integers(0, n, size=(samples, n)))
    low, high = np.percentile(boot, [2.5, 97.5])
    return Difference(float(stat(np.arange(n))), float(low), float(high), n)


def length_stratum(text: str) -> str:
    """Query length in words: ``1-2``, ``3-4`` or ``5+`` (METHOD.md "Metrics")."""
    n = len(text.split())
    return "1-2" if n <= 2 else "3-4" if n <= 4 else "5+"
