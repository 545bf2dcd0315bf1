"""Retrieval on top of the indexes, shared by evaluation and serving so that the numbers we
report are the numbers we serve: the hybrid fusion of dense and BM25 lists (``hybrid``)."""
