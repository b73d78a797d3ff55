#!/usr/bin/env bash
# Runs the test suite (creating .venv first if needed).
set -euo pipefail
cd "$(dirname "$0")"
scripts/env.sh
export HF_HUB_OFFLINE=1
.venv/bin/python -m pytest -q "$@"
