#!/usr/bin/env bash
# Set up (first run) and run the platform end to end on the embedded default catalog.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m data_jobs.prepare_catalog --config configs/prepare_synthetic.yaml "$@"
