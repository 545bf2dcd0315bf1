"""Hybrid retrieval: reciprocal-rank fusion of several retrievers (Cormack et al., 2009).

    RRF(d) = Σ_r w_r / (k_rrf + rank_r(d)),   rank starting at 1; absent from a list adds 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from retrieval_platform.retrievers import Hits, Retriever

RRF_K = 60


def rrf_fuse(ranked_lists: Sequence[Sequence[str]], k: int, *, rrf_k: int = RRF_K,
             weights: Sequence[float] | None = None) -> Hits:
    """Fuse ranked id lists (best first) into the top-k ``(product_id, rrf score)``."""
    weights = weights or [1.0] * len(ranked_lists)
    fused: dict[str, float] = {}
    for w, ranked in zip(weights, ranked_lists, strict=True):
        for rank, pid in enumerate(ranked, start=1):
            fused[pid] = fused.get(pid, 0.0) + w / (rrf_k + rank)
    # Ties broken by id, so that the fused order is deterministic.
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


class HybridRetriever:
    name = "hybrid"

    def __init__(self, retrievers: Sequence[Retriever], *, depth: int = 100,
                 rrf_k: int = RRF_K) -> None:
        self.retrievers = list(retrievers)
        self.depth = depth
        self.rrf_k = rrf_k

    def search(self, queries: Sequence[str], k: int) -> list[Hits]:
        per = [r.search(queries, max(k, self.depth)) for r in self.retrievers]
        return [
            rrf_fuse([[p for p, _ in hits[q]] for hits in per], k, rrf_k=self.rrf_k)
            for q in range(len(queries))
        ]

    def score(self, query: str, product_ids: Sequence[str]) -> np.ndarray:
        """Fused score of given products: each retriever ranks them among themselves."""
        ranks = []
        for r in self.retrievers:
            s = r.score(query, product_ids)
            order = np.argsort(-s, kind="stable")
            rank = np.empty(len(s))
            rank[order] = np.arange(1, len(s) + 1)
            ranks.append(rank)
        return np.sum([1.0 / (self.rrf_k + r) for r in ranks], axis=0)
