#!/usr/bin/env bash
# The rollout engine's GPU figures in one device call (carry .gpu): the SSM-step kernel's tests and timing, then
# bench_rollout.py on the Nano-9B-v2 architecture, uniform 1024-token completions at batch 64 and 256, and
# long-tailed lengths at batch 256. Each part writes under $OUT as it ends.
#   bash bench/gpu_rollout.sh [longtail max new tokens, default 2048]
. bench/gpu_env.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/test/*.whl 2>/dev/null
longest=${1:-2048}
python3 -m pytest tests/test_ssm_step.py tests/test_generation.py -k "ssm or cuda" -o addopts="" -p no:cacheprovider \
  -q -rfEs --tb=short > "$OUT/tests.log" 2>&1 || { tail -40 "$OUT/tests.log"; exit 1; }
tail -3 "$OUT/tests.log"
python3 bench/bench_ssm_step.py --out "$OUT/ssm_step" 2>&1 | grep -v -i warn
rollout() { python3 bench/bench_rollout.py --model nano9b --repeats 1 "$@" 2>&1 | grep -v -i warn | grep -v "^---\|^lengths"; }
rollout --lengths uniform --max-new-tokens 1024 --batches 64 --groups 8 --sides static,continuous,continuous-fp32 \
  --out "$OUT/u64"
rollout --lengths uniform --max-new-tokens 1024 --batches 256 --groups 32 --sides static,continuous,continuous-fp32 \
  --out "$OUT/u256"
rollout --lengths longtail --min-new-tokens $((longest / 32)) --max-new-tokens "$longest" --batches 256 --groups 64 \
  --sides static,continuous,continuous-nofork --out "$OUT/longtail"
