"""Dense retrieval: the dual encoder's query vectors against product vectors in FAISS."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from retrieval_platform.encoder.model import DualEncoder
from retrieval_platform.index.faiss_ops import IndexParams, build_index, search_index
from retrieval_platform.retrievers import Hits


class DenseRetriever:
    def __init__(self, encoder: DualEncoder, product_ids: Sequence[str], vectors: np.ndarray,
                 *, params: IndexParams | None = None, name: str = "dense",
                 batch_size: int = 64) -> None:
        self.name = name
        self.encoder = encoder
        self.product_ids = list(product_ids)
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (n, d)
        self.params = params or IndexParams()
        self.index = build_index(self.vectors, self.params)
        self.batch_size = batch_size
        self._pos = {p: i for i, p in enumerate(self.product_ids)}

    def search(self, queries: Sequence[str], k: int) -> list[Hits]:
        if not queries:
            return []
        xq = self.encoder.encode(list(queries), "query", batch_size=self.batch_size)  # (nq, d)
        D, I = search_index(self.index, xq, min(k, len(self.product_ids)), self.params)
        return [[(self.product_ids[i], float(d)) for d, i in zip(rd, ri, strict=True) if i >= 0]
                for rd, ri in zip(D, I, strict=True)]

    def score(self, query: str, product_ids: Sequence[str]) -> np.ndarray:
        xq = self.encoder.encode([query], "query")[0]  # (d,)
        rows = [self._pos[p] for p in product_ids]
        return self.vectors[rows] @ xq
