"""Retrieval pieces shared by evaluation and serving, so that the numbers we report are the
numbers we serve: BM25 (``bm25``, bm25s) and the hybrid fusion (``hybrid``). Dense search is
FAISS (``index.faiss_ops``). A result list is ``Hits``: ``(product_id, score)`` best first.
"""

from __future__ import annotations

Hits = list[tuple[str, float]]
