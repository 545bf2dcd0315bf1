"""The cross-encoder reranker: graded listwise training on Ray Train.

    python -m train_jobs.rerank --config configs/synthetic/rerank.yaml
"""

from __future__ import annotations

import sys

from retrieval_platform.jobs import job_main
from retrieval_platform.reranker.training import RerankConfig, train_reranker

CONFIG = RerankConfig


def main(argv: list[str] | None = None) -> int:
    return job_main("train_rerank", CONFIG, train_reranker, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
