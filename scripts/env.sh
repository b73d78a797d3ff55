#!/usr/bin/env bash
# Creates a virtual environment in the repository (once) and installs mmtoken into it from a lock file, so every
# install gets the releases CI tested; fast when already done.
#   scripts/env.sh          .venv from locks/newest.txt: every extra (dev, eval: lmms-eval, ~140 packages; demo, serve,
#                           search) at the newest supported releases, plus Debian's chromium for the demo's browser test
#   scripts/env.sh oldest   .venv-oldest from locks/oldest.txt: the package and its test tools at the oldest supported
#                           transformers, for the invariants (CI runs both)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
end="${1:-newest}"
case "$end" in
  newest) venv="$root/.venv" ;;
  oldest) venv="$root/.venv-oldest" ;;
  *) echo "usage: scripts/env.sh [newest|oldest]" >&2; exit 2 ;;
esac
lock="$root/locks/$end.txt"
stamp="$venv/.mmtoken-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "$lock" -nt "$stamp" ]; then
  # torch's CUDA build makes each environment large (newest ~7.5 GB, oldest ~6 GB): say so before pip runs out
  need_gb=$([ "$end" = newest ] && echo 9 || echo 7)
  free_gb=$(( $(df --output=avail -k "$root" | tail -1) / 1024 / 1024 ))
  if [ ! -d "$venv" ] && [ "$free_gb" -lt "$need_gb" ]; then
    echo "scripts/env.sh: the $end environment needs about $need_gb GB free; $root has $free_gb GB" >&2
    exit 1
  fi
  python3 -m venv "$venv"
  # pip warns about every local index folder it skips; keep its errors only
  { "$venv/bin/python" -m pip install --quiet -r "$lock" \
      && "$venv/bin/python" -m pip install --quiet --no-deps -e "$root"; } 2>&1 | { grep -v "is ignored: it is neither" || true; }
  touch "$stamp"
fi
if [ "$end" = newest ] && ! command -v chromium >/dev/null; then
  sudo=$([ "$(id -u)" = 0 ] || echo sudo)
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium; } >/dev/null
fi
