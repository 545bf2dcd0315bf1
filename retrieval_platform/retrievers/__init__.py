"""Ranked lists and how they are fused, one definition for evaluation and serving so that the
numbers we report are the numbers we serve: a ranked list's type (``ScoredIds``) and the hybrid
fusion of a dense and a BM25 list (``hybrid``). It depends on nothing else of the platform: the
indexes produce these lists, the index manifest records the fusion."""

ScoredIds = list[tuple[str, float]]  # (product_id, score), best first
