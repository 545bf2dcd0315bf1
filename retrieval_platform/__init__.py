"""retrieval_platform: semantic product search on Ray.

Catalog preparation (Ray Data), a Siamese dual encoder trained in two stages (masked
contrastive, then ROAR; Ray Train), evaluation against BM25, and a sharded FAISS search service
(Ray Serve). The method's equations are in docs/METHOD.md; modules cite them by number.
"""

__version__ = "0.1.0"
