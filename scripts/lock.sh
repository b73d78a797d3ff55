#!/usr/bin/env bash
# Re-resolves the two lock files with uv (run it after changing a dependency in pyproject.toml, then run CI):
#   locks/newest.txt  every extra, at the newest releases the ranges in pyproject.toml allow (the main environment);
#   locks/oldest.txt  the package and the test tools at the oldest supported transformers (CI's second environment).
set -euo pipefail
cd "$(dirname "$0")/.."
uv=(.venv/bin/uv pip compile --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 -c locks/cap.txt)
"${uv[@]}" pyproject.toml --extra dev --extra eval --extra demo --extra search -o locks/newest.txt
"${uv[@]}" pyproject.toml locks/oldest.in -o locks/oldest.txt
