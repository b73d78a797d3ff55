#!/usr/bin/env bash
# Trains a probe model on a GPU machine within a time budget: measures the step rate with a short run, sizes the
# cosine schedule to fit the budget, then trains. Usage: scripts/train_probe_gpu.sh NAME MINUTES OUT [RESUME]
set -euo pipefail
name=$1 minutes=$2 out=$3 resume=${4:-}
batch=128
rate=$(python3 -m mmtoken zoo train "$name" --out /tmp/rate-probe --steps 60 --batch-size $batch \
  | grep samples_per_s | tail -1 | python3 -c "import json, sys; print(json.loads(sys.stdin.read())['samples_per_s'])")
steps=$(python3 -c "print(int($rate * 60 * $minutes / $batch))")
echo "measured $rate samples/s: $steps steps of $batch in $minutes minutes"
python3 -m mmtoken zoo train "$name" --out "$out" --steps "$steps" --batch-size $batch --minutes "$minutes" \
  ${resume:+--resume "$resume"}
