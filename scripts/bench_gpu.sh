#!/usr/bin/env bash
# The GPU speed matrix of BENCHMARKS.md: mmtoken bench on each real-size shape (LLaVA-1.5-7B; Qwen2.5-VL-7B with one
# 1344 px image and with 32 frames; LLaVA-OneVision-7B with 32 frames), batch 1 and 8, FastV / PyramidDrop / uniform
# at the papers' 192 / 128 / 64 budgets (as fractions of each shape's visual tokens). About 8 minutes on an H100.
# Writes OUT/SHAPE/speed.{json,md} per shape and OUT/speed.md with all of them; a shape that fails is reported and
# the others still run. Usage: [SHAPES="..."] scripts/bench_gpu.sh OUT [more mmtoken bench options, e.g.
# --attention eager, or --methods visionzip holitom for other methods]
set -uo pipefail
out=$1
shift
export PYTHONUNBUFFERED=1
failed=()
for shape in ${SHAPES:-llava15-7b qwen25vl-7b-image qwen25vl-7b-video onevision-7b-video}; do
  started=$SECONDS
  if python3 -m mmtoken bench --shapes "$shape" --batch 1 8 --methods fastv pdrop uniform --repeats 3 \
    --generate-repeats 1 --out "$out/$shape" "$@"; then
    echo "$shape: $((SECONDS - started)) s"
  else
    failed+=("$shape")
  fi
done
cat "$out"/*/speed.md > "$out/speed.md" 2>/dev/null
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
