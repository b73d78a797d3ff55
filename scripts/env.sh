#!/usr/bin/env bash
# Creates .venv in the repository (once) and installs mmtoken with its dev and eval (lmms-eval) extras into it;
# fast when already done. The eval extra adds ~140 packages (~1.2 GB, ~2.5 min); it keeps the torch already installed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.mmtoken-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  python3 -m venv "$venv"
  # pip warns about every local index folder it skips; keep its errors only
  "$venv/bin/python" -m pip install --quiet -e "$root[dev,eval]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
  touch "$stamp"
fi
