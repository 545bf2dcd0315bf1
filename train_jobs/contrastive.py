"""Stage 1: contrastive training with the false-negative margin mask (Ray Train).

    python -m train_jobs.contrastive --config configs/synthetic/stage1.yaml
"""

from __future__ import annotations

import sys

from retrieval_platform.jobs import job_main
from retrieval_platform.training.config import TrainConfig
from retrieval_platform.training.trainer import stage_job

CONFIG = TrainConfig


def main(argv: list[str] | None = None) -> int:
    return job_main("train_contrastive", CONFIG, stage_job("contrastive"), argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
