"""Prepare a catalog for training, evaluation and indexing (Ray Data).

    python -m data_jobs.prepare_catalog --config configs/prepare_synthetic.yaml
    python -m data_jobs.prepare_catalog --config configs/prepare_homedepot.yaml \
        --set source.path=../shared/data/homedepot
"""

from __future__ import annotations

import json
import sys

from retrieval_platform.catalog.prepare import PrepareConfig, prepare_catalog
from retrieval_platform.config import parse_job_args
from retrieval_platform.jobs import run_job

CONFIG = PrepareConfig


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(CONFIG, argv, __doc__)

    def body() -> None:
        manifest = prepare_catalog(cfg)
        print(json.dumps({"output_dir": cfg.output_dir, "counts": manifest["counts"],
                          "splits": manifest["splits"],
                          "wall_seconds": manifest["wall_seconds"]}, indent=2))

    return run_job("prepare_catalog", body)


if __name__ == "__main__":
    sys.exit(main())
