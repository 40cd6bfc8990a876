#!/usr/bin/env bash
# The rollout engine's GPU figures in one device call (carry .gpu). Each part writes under $OUT as it ends.
#   bash bench/gpu_rollout.sh [parts...]     parts (default: tests ssm uniform longtail):
#     tests      the CUDA paths' equivalence tests (SSM step, graph vs dynamic, tail moved to smaller graphs)
#     ssm        the SSM-step kernel against mamba-ssm's, one Nano-9B layer
#     breakdown  one batch-256 decode step: graph alone, sampler, host work, and its kernels by time
#     uniform    bench_rollout.py, Nano-9B-v2, uniform 1024-token completions at batch 64 and 256
#     longtail   bench_rollout.py, Nano-9B-v2, log-uniform 64..$LONGEST (default 2048) tokens, batch 256, $PROMPTS
#                prompts x 8 samples (default 64: two batches' worth), sides $LONGTAIL_SIDES (default
#                static,continuous-fixed,continuous)
#     grpo       bench_grpo.py: a GRPO step of Nano-9B-v2 with LoRA, 64 prompts x 8, the same long-tailed lengths,
#                the static batch's CUDA graph against continuous batching (bf16 SSM state on both); a warm-up
#                step of short samples
. bench/gpu_env.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/test/*.whl 2>/dev/null
parts=${*:-tests ssm uniform longtail}
longest=${LONGEST:-2048}
groups=${PROMPTS:-64}
rollout() { python3 bench/bench_rollout.py --model nano9b --repeats 1 "$@" 2>&1 | grep -v -i warn | grep -v "^---\|^lengths"; }
for part in $parts; do
  echo "== $part"
  case $part in
    tests)
      python3 -m pytest tests/test_ssm_step.py tests/test_generation.py tests/test_rollout_engine.py \
        -k "ssm or cuda or gpu" -o addopts="" -p no:cacheprovider -q -rfEs --tb=short > "$OUT/tests.log" 2>&1 \
        || { tail -40 "$OUT/tests.log"; exit 1; }
      tail -3 "$OUT/tests.log" ;;
    ssm) python3 bench/bench_ssm_step.py --out "$OUT/ssm_step" 2>&1 | grep -v -i warn ;;
    breakdown)
      python3 bench/decode_breakdown.py --model nano9b --batches 256 --steps 10 --repeats 3 --profile \
        --out "$OUT/breakdown" 2>&1 | grep -v -i warn ;;
    uniform)
      rollout --lengths uniform --max-new-tokens 1024 --batches 64 --groups 8 --sides static,continuous,continuous-fp32 \
        --out "$OUT/u64"
      rollout --lengths uniform --max-new-tokens 1024 --batches 256 --groups 32 --sides static,continuous,continuous-fp32 \
        --out "$OUT/u256" ;;
    longtail)
      rollout --lengths longtail --min-new-tokens $((longest / 32)) --max-new-tokens "$longest" --batches 256 \
        --groups "$groups" --sides "${LONGTAIL_SIDES:-static,continuous-fixed,continuous}" --out "$OUT/longtail" ;;
    grpo)
      python3 bench/bench_grpo.py --device cuda --model-json configs/nano9b/model_nano9b_v2.json --lengths longtail \
        --min-new-tokens $((longest / 32)) --max-new-tokens "$longest" --decodes cuda-graph,continuous --steps 2 \
        --warmup-tokens 16 --set lora.enabled=true --set train.loss_chunk_tokens=2048 \
        --set train.activation_checkpointing=true --set rollout.batch_size=256 --set rollout.ssm_state_dtype=model \
        --out "$OUT/grpo" 2>&1 | grep -v -i warn | tail -30 ;;
    *) echo "unknown part: $part"; exit 2 ;;
  esac
done
