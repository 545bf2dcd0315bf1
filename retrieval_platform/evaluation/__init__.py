"""Evaluation with full-corpus retrieval: running the systems on a split (``run``, the body of
``train_jobs.evaluate``) and the report they give (``report``)."""
