"""Analyse an experiment's impression and event log: per-arm CTR@k, add-to-cart, order rate and
MRR with 95 % bootstrap intervals over users, each arm against the control, and the
interleaving preference.

    python -m data_jobs.analyze_experiment --config configs/synthetic/analyze_experiment.yaml
"""

from __future__ import annotations

import sys

from retrieval_platform.experiments.analysis import AnalyzeConfig, analyze_log
from retrieval_platform.jobs import job_main

CONFIG = AnalyzeConfig


def main(argv: list[str] | None = None) -> int:
    return job_main("analyze_experiment", CONFIG, analyze_log, argv, __doc__,
                    summarize=lambda report: report.markdown())


if __name__ == "__main__":
    sys.exit(main())
