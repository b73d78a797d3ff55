#!/usr/bin/env bash
# Trains a probe model on a GPU machine within a time budget: measures the step rate with a short run, sizes the
# cosine schedule to fit the budget, then trains. Usage:
#   scripts/train_probe_gpu.sh NAME MINUTES OUT [RESUME]      question answering (a v2 recipe: PRETRAINED=TOWER_DIR
#                                                            starts it from a pretrained tower)
#   STAGE=pretrain scripts/train_probe_gpu.sh NAME MINUTES OUT [RESUME]   a v2 recipe's contrastive tower pretraining
# BATCH=N sets the batch (default 256 for pretraining, 128 for question answering).
set -euo pipefail
name=$1 minutes=$2 out=$3 resume=${4:-}
stage=${STAGE:-train}
batch=${BATCH:-$([ "$stage" = pretrain ] && echo 256 || echo 128)}
start=()
[ -n "${PRETRAINED:-}" ] && start=(--pretrained "$PRETRAINED")
rate=$(python3 -m mmtoken zoo "$stage" "$name" --out /tmp/rate-probe --steps 60 --batch-size $batch "${start[@]}" \
  | grep samples_per_s | tail -1 | python3 -c "import json, sys; print(json.loads(sys.stdin.read())['samples_per_s'])")
steps=$(python3 -c "print(int($rate * 60 * $minutes / $batch))")
echo "measured $rate samples/s: $steps steps of $batch in $minutes minutes"
if [ -n "$resume" ]; then  # --steps is the run's total: the checkpoint's steps plus this budget's
  start=(--resume "$resume")
  steps=$(( steps + $(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['step'])" "$resume/state.json") ))
fi
python3 -m mmtoken zoo "$stage" "$name" --out "$out" --steps "$steps" --batch-size $batch --minutes "$minutes" \
  "${start[@]}"
