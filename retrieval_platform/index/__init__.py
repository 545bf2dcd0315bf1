"""The search indexes and their versioned folder: sharded FAISS (typed build/search/merge
functions, ``faiss_ops``), BM25 (``bm25``), the on-disk format and loaders (``store``). The Ray Data
job that builds a version is :mod:`retrieval_platform.indexing`, above this package."""

Hits = list[tuple[str, float]]  # (product_id, score), best first
