"""Job entry points that read and write data (thin: the logic is in retrieval_platform)."""
