#!/usr/bin/env bash
# The whole pipeline on the lent GPU machine (configs/gpu/pipeline.yaml); keeps the small artifacts under $OUT
# (checkpoints stay in /tmp: a 250M model's weights are too large to bring back).
#   bash bench/gpu_pipeline.sh [seconds]
. bench/gpu_env.sh || exit 1
run=/tmp/gpu_pipeline
rm -rf "$run"
start=$(date +%s)
timeout "${1:-540}" python3 -m alignment.cli pipeline configs/gpu/pipeline.yaml run_dir="$run" > "$OUT/pipeline.log" 2>&1
echo "rc=$? after $(( $(date +%s) - start )) s" >> "$OUT/pipeline.log"
(cd "$run" && find . -maxdepth 2 \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.png' \) \
   -not -path '*/checkpoint/*' -print0 | tar cf - --null -T - | tar xf - -C "$OUT")
grep -v "generating \|it/s\]\|s/step" "$OUT/pipeline.log" | tail -40
