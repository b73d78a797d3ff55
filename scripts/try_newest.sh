#!/usr/bin/env bash
# Tries the newest releases that pyproject.toml's ranges allow, without the lock: a fresh .venv-try resolved from
# scratch, then the invariants on every family. If they pass, `scripts/lock.sh` records the new releases in the lock
# and CI runs the whole suite on them.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .venv-try
python3 -m venv .venv-try
.venv-try/bin/python -m pip install --quiet --upgrade -e ".[dev]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
.venv-try/bin/python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
HF_HUB_OFFLINE=1 .venv-try/bin/python -m pytest -q tests/test_invariants.py "$@"
