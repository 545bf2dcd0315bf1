"""Fold a live catalog's change log into a new index version, and swap the served app to it.

    python -m data_jobs.compact_index --config configs/synthetic/compact_index.yaml
"""

from __future__ import annotations

import sys

from retrieval_platform.index.compact import CompactConfig, compact
from retrieval_platform.jobs import job_main

CONFIG = CompactConfig


def main(argv: list[str] | None = None) -> int:
    return job_main("compact_index", CONFIG, compact, argv, __doc__,
                    summarize=lambda m: {"path": m.path, "version": m.version,
                                         "num_products": m.num_products,
                                         "log_position": m.log_position})


if __name__ == "__main__":
    sys.exit(main())
