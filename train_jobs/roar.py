"""Stage 2: ROAR preference optimisation over graded groups, from stage 1's model (Ray Train).

    python -m train_jobs.roar --config configs/synthetic/stage2.yaml
"""

from __future__ import annotations

import sys

from retrieval_platform.jobs import job_main
from retrieval_platform.training.config import TrainConfig
from retrieval_platform.training.trainer import stage_job

CONFIG = TrainConfig


def main(argv: list[str] | None = None) -> int:
    return job_main("train_roar", CONFIG, stage_job("roar"), argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
