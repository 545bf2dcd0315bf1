"""Prepare a catalog for training, evaluation and indexing (Ray Data).

    python -m data_jobs.prepare_catalog --config configs/synthetic/prepare.yaml
    python -m data_jobs.prepare_catalog --config configs/homedepot/prepare.yaml \
        --set source.path=../shared/data/homedepot
"""

from __future__ import annotations

import sys

from retrieval_platform.catalog.prepare import PrepareConfig, prepare_catalog
from retrieval_platform.jobs import job_main

CONFIG = PrepareConfig


def main(argv: list[str] | None = None) -> int:
    return job_main("prepare_catalog", CONFIG, prepare_catalog, argv, __doc__,
                    summarize=lambda m: {k: m[k] for k in ("counts", "splits", "wall_seconds")})


if __name__ == "__main__":
    sys.exit(main())
