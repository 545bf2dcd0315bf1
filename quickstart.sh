#!/usr/bin/env bash
# The platform end to end: set up .venv (first run), start a local Ray cluster with its
# dashboard, prepare the catalog, train both stages, evaluate, build the index, serve it, query.
#
#   ./quickstart.sh                      the embedded default (a generated catalog): on 2
#                                        AVX2 cores 34 min on a new clone (install 3.7 min),
#                                        7.6 min where the CPU trains in bf16 (AVX512-BF16)
#   ./quickstart.sh --smoke              the same steps at smoke size (600 products, a few
#                                        training steps), as CI runs it: ~10 min
#   ./quickstart.sh --homedepot [PATH]   Home Depot data (default ../shared/data/homedepot)
#   ./quickstart.sh --config FILE [...]  any pipeline config (and retrieval-platform options)
#   ./quickstart.sh stop                 stop Serve, the jobs and the local Ray cluster
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The local cluster uses token authentication: the pipeline generates ~/.ray/auth_token where
# there is none, before `ray start`; clients send it in token mode.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
RP=.venv/bin/retrieval-platform
case "${1:-}" in
  stop) exec "$RP" stop ;;
  status) exec "$RP" status ;;
  --homedepot)
    shift
    path=${1:-../shared/data/homedepot}
    [ $# -gt 0 ] && shift
    exec "$RP" pipeline --config configs/homedepot/pipeline.yaml --data-path "$path" "$@" ;;
  --smoke)
    shift
    exec "$RP" pipeline --config configs/synthetic/pipeline.yaml --smoke "$@" ;;
  *) exec "$RP" pipeline --config configs/synthetic/pipeline.yaml "$@" ;;
esac
