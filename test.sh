#!/usr/bin/env bash
# Set up (first run) and run the test suite: ./test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_env.sh
export RAY_DATA_DISABLE_PROGRESS_BARS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
