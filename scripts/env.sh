#!/usr/bin/env bash
# Creates .venv in the repository (once) and installs mmtoken into it with the dev, demo and search extras, plus
# Debian's chromium for the demo's browser test (playwright drives it); fast when already done.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.mmtoken-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  python3 -m venv "$venv"
  # pip warns about every local index folder it skips; keep its errors only
  "$venv/bin/python" -m pip install --quiet -e "$root[dev,demo,search]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
  touch "$stamp"
fi
if ! command -v chromium >/dev/null; then
  sudo=$([ "$(id -u)" = 0 ] || echo sudo)
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium; } >/dev/null
fi
