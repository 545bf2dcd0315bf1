"""Simulate an online experiment on judged queries: simulated shoppers, a position-based click
model over the graded judgments, the platform's own log and analysis; A/B and interleaving
over growing numbers of users, against the offline NDCG@10 of the two arms.

    python -m data_jobs.simulate_experiment --config configs/homedepot/simulate_experiment.yaml
"""

from __future__ import annotations

import json
import sys

from retrieval_platform.experiments.simulation import SimulateConfig, simulate
from retrieval_platform.jobs import job_main

CONFIG = SimulateConfig


def main(argv: list[str] | None = None) -> int:
    return job_main("simulate_experiment", CONFIG, simulate, argv, __doc__,
                    summarize=lambda r: json.dumps(
                        {k: r[k] for k in ("queries", "offline_ndcg", "better_offline")}
                        | {d: {"users_needed": v["users_needed"], "power": v["power"]}
                           for d, v in r["designs"].items()}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
