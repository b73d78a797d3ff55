#!/usr/bin/env bash
# Checks the import contracts of pyproject.toml with lint-imports, on a copy of the package installed into a
# temporary folder: there the folders that pyproject.toml maps into the package (integrations/, evaluation/, ...)
# sit inside it, as import-linter needs.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
"$root/.venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation --target "$site" "$root" 2>&1 \
  | { grep -v "is ignored: it is neither" || true; }
rm -rf "$root/build"
cd "$site" && PYTHONPATH="$site" "$root/.venv/bin/lint-imports" "$root/pyproject.toml"
