"""Training and evaluation job entry points (thin: the logic is in retrieval_platform)."""
