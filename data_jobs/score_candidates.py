"""Score each training query's candidate list with a teacher (the cross-encoder reranker, or an
index version's hybrid) for distillation in stage 2 (Ray Data actors that load it once).

    python -m data_jobs.score_candidates --config configs/homedepot/score_candidates.yaml
"""

from __future__ import annotations

import sys

from retrieval_platform.jobs import job_main
from retrieval_platform.training.teacher import ScoreCandidatesConfig, score_candidates

CONFIG = ScoreCandidatesConfig


def main(argv: list[str] | None = None) -> int:
    return job_main("score_candidates", CONFIG, score_candidates, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
