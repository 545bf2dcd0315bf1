"""Embed a prepared catalog with a model folder (Ray Data) and publish a sharded FAISS index.

    python -m data_jobs.build_index --config configs/build_index_synthetic.yaml
"""

from __future__ import annotations

import sys

from retrieval_platform.indexing import BuildIndexConfig, build_index_dir
from retrieval_platform.jobs import job_main

CONFIG = BuildIndexConfig


def main(argv: list[str] | None = None) -> int:
    return job_main("build_index", CONFIG, build_index_dir, argv, __doc__,
                    summarize=lambda m: {k: m[k] for k in ("path", "version", "num_products",
                                                           "model", "wall_seconds")})


if __name__ == "__main__":
    sys.exit(main())
