"""The search indexes and their versioned folder: sharded FAISS (typed build/search/merge
functions, ``faiss_ops``), BM25 (``bm25``), the on-disk format, its manifest types and loaders
(``store``), and the job body that builds a version (``build``)."""
