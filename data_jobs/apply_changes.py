"""Apply a file (or folder, or bucket prefix) of catalog changes to a served index: upserts
embedded with Ray Data, every change through the application's writer (validated, logged,
replicated as HTTP writes are); rejected lines kept with their reason.

    python -m data_jobs.apply_changes --config configs/synthetic/apply_changes.yaml
"""

from __future__ import annotations

import sys
from dataclasses import asdict

from retrieval_platform.jobs import job_main
from retrieval_platform.serving.bulk import ApplyChangesConfig, apply_changes

CONFIG = ApplyChangesConfig


def main(argv: list[str] | None = None) -> int:
    return job_main("apply_changes", CONFIG, apply_changes, argv, __doc__, summarize=asdict)


if __name__ == "__main__":
    sys.exit(main())
