"""Embed a prepared catalog with a model folder (Ray Data) and publish a sharded FAISS index.

    python -m data_jobs.build_index --config configs/synthetic/build_index.yaml
"""

from __future__ import annotations

import sys
from dataclasses import asdict

from retrieval_platform.index.build import BuildIndexConfig, build_version
from retrieval_platform.jobs import job_main

CONFIG = BuildIndexConfig


def main(argv: list[str] | None = None) -> int:
    return job_main("build_index", CONFIG, build_version, argv, __doc__,
                    summarize=lambda m: {"path": m.path, "version": m.version,
                                         "num_products": m.num_products, "model": asdict(m.model),
                                         "wall_seconds": m.wall_seconds})


if __name__ == "__main__":
    sys.exit(main())
