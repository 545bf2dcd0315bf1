"""Evaluate model folders, BM25 and hybrid on a prepared dataset's split (full corpus).

    python -m train_jobs.evaluate --config configs/evaluate_synthetic.yaml
"""

from __future__ import annotations

import sys

from retrieval_platform.evaluation import EvaluateConfig, evaluate, render_markdown
from retrieval_platform.jobs import job_main

CONFIG = EvaluateConfig


def main(argv: list[str] | None = None) -> int:
    return job_main("evaluate", CONFIG, evaluate, argv, __doc__, summarize=render_markdown)


if __name__ == "__main__":
    sys.exit(main())
