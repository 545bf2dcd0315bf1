"""The cross-encoder reranker: its model, training (Ray Train), batch scoring and evaluation."""
