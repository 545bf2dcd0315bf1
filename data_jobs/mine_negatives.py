"""Mine hard negatives for stage 1 with any model folder (Ray Data embedding + FAISS).

    python -m data_jobs.mine_negatives --config configs/synthetic/mine_negatives.yaml
"""

from __future__ import annotations

import sys

from retrieval_platform.jobs import job_main
from retrieval_platform.training.mining import MineConfig, mine_negatives

CONFIG = MineConfig


def main(argv: list[str] | None = None) -> int:
    return job_main("mine_negatives", CONFIG, mine_negatives, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
