"""Hybrid retrieval: fusion of a dense and a lexical ranking, one definition for evaluation and
serving (``fuse``), so that the hybrid numbers we report are the ones we serve.

- ``rrf`` (Cormack et al., 2009): RRF(d) = Σ_r w_r / (k_rrf + rank_r(d)), ranks from 1; a
  product absent from a list adds 0 for it.
- ``convex`` (Bruch et al., 2023, "An Analysis of Fusion Functions for Hybrid Retrieval"):
  s(d) = α · ŝ_dense(d) + (1 − α) · ŝ_lexical(d), where ŝ is each list's score min-max
  normalised over that list's retrieved top-depth (its best hit 1, its last 0); absent = 0.
  Unlike RRF it keeps how far apart the scores are, and α is tuned on a dev split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from retrieval_platform.retrievers import ScoredIds

RRF_K = 60
# Candidates each side brings to a hybrid answer, served (serving.search.candidate_depth) and
# evaluated (evaluation.run) alike: the hybrid numbers we report are the ones we serve.
HYBRID_DEPTH = 100


@dataclass
class Fusion:
    method: Literal["rrf", "convex"] = "rrf"
    dense_weight: float = 0.5  # α of convex fusion (the lexical side gets 1 − α)
    rrf_k: int = RRF_K

    def __post_init__(self) -> None:
        if self.method not in ("rrf", "convex"):
            raise ValueError(f"unknown fusion {self.method!r} (use rrf or convex)")
        if not 0.0 <= self.dense_weight <= 1.0:
            raise ValueError("fusion.dense_weight must be in [0, 1]")

    @property
    def label(self) -> str:
        return "rrf" if self.method == "rrf" else f"convex{self.dense_weight:g}"


def rrf_fuse(ranked_lists: Sequence[Sequence[str]], k: int, *, rrf_k: int = RRF_K,
             weights: Sequence[float] | None = None) -> ScoredIds:
    """Fuse ranked id lists (best first) into the top-k ``(product_id, rrf score)``."""
    weights = weights or [1.0] * len(ranked_lists)
    fused: dict[str, float] = {}
    for w, ranked in zip(weights, ranked_lists, strict=True):
        for rank, pid in enumerate(ranked, start=1):
            fused[pid] = fused.get(pid, 0.0) + w / (rrf_k + rank)
    return _top(fused, k)


def minmax_bounds(hits: ScoredIds) -> tuple[float, float]:
    """(lowest, highest) score of a retrieved list; (0, 1) for an empty one."""
    if not hits:
        return 0.0, 1.0
    scores = [s for _, s in hits]
    return min(scores), max(scores)


def normalise(score: float | np.ndarray, bounds: tuple[float, float]) -> float | np.ndarray:
    """Min-max normalisation with a list's bounds (a list of equal scores maps to 1)."""
    lo, hi = bounds
    return (score - lo) / (hi - lo) if hi > lo else score * 0 + 1.0


def convex_fuse(dense: ScoredIds, lexical: ScoredIds, k: int, *, dense_weight: float) -> ScoredIds:
    """α · min-max(dense) + (1 − α) · min-max(lexical), absent = 0; the top-k."""
    fused: dict[str, float] = {}
    for weight, hits in ((dense_weight, dense), (1.0 - dense_weight, lexical)):
        bounds = minmax_bounds(hits)
        for pid, score in hits:
            fused[pid] = fused.get(pid, 0.0) + weight * float(normalise(score, bounds))
    return _top(fused, k)


def fuse(dense: ScoredIds, lexical: ScoredIds, k: int, fusion: Fusion | None = None) -> ScoredIds:
    """The hybrid top-k of a dense and a lexical list (each best first, with scores)."""
    fusion = fusion or Fusion()
    if fusion.method == "convex":
        return convex_fuse(dense, lexical, k, dense_weight=fusion.dense_weight)
    return rrf_fuse([[p for p, _ in dense], [p for p, _ in lexical]], k, rrf_k=fusion.rrf_k)


def _top(fused: dict[str, float], k: int) -> ScoredIds:
    # Ties broken by id, so that the fused order is deterministic.
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
