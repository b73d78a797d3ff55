#!/usr/bin/env bash
# Creates .venv if needed, then runs the main job: `mmtoken compare`.
set -euo pipefail
cd "$(dirname "$0")"
scripts/env.sh
export HF_HUB_OFFLINE=1
.venv/bin/mmtoken compare "$@"
