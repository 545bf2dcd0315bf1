"""Evaluate model folders, BM25 and hybrid on a prepared dataset's split (full corpus).

    python -m train_jobs.evaluate --config configs/synthetic/evaluate.yaml
"""

from __future__ import annotations

import sys

from retrieval_platform.evaluation.report import render_markdown
from retrieval_platform.evaluation.run import EvaluateConfig, evaluate
from retrieval_platform.jobs import job_main

CONFIG = EvaluateConfig


def main(argv: list[str] | None = None) -> int:
    return job_main("evaluate", CONFIG, evaluate, argv, __doc__, summarize=render_markdown)


if __name__ == "__main__":
    sys.exit(main())
