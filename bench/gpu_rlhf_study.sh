# RLHF with a trained reward model on the tiny model (README "RLHF with a reward model"), one device call; carry .gpu
# (bench/gpu_env.sh) and SFT=<folder> holding seed{0,1}/checkpoint (carry it too):
#   SFT=.gpu_ckpt bash bench/gpu_rlhf_study.sh
# The synthetic preferences (TRACE_SHARE: the share of incomplete- and extra-step pairs), `align rm` from seed 0's SFT model
# (held-out pair accuracy by kind), then GRPO against it from both seeds' SFT models side by side, one run per seed
# and variant, each evaluated before and after on the validation split (math accuracy and the reward model's mean
# score): choose the variant there. Last, `align eval` of every seed's SFT model and its variants on the test split
# (report only the chosen variant's).
# Variants: rm (reward model only on the chat route), rm_math (plus the math reward), rm_length (plus a
# group-relative length penalty on the thinking); RM_NORMALIZE=group and GRPO_ARGS="key=value ..." change all of them.
# The device has no Ray: the reward model is served in process.
# -> $OUT/rlhf_results.tgz
set -u
. bench/gpu_env.sh
nvidia-smi --query-gpu=name --format=csv,noheader; date -u; git log --oneline | head -1
start=$(date +%s)
VARIANTS=${VARIANTS:-rm rm_math}
mkdir -p $OUT/r
trap 'tar czf $OUT/rlhf_results.tgz -C $OUT r; rm -rf $OUT/r' EXIT
align data configs/tiny/data.yaml preferences=true preferences_trace_share=${TRACE_SHARE:-0.4} \
  > $OUT/r/data.log 2>&1 || { tail -20 $OUT/r/data.log; exit 1; }
align rm configs/tiny/rlhf/rm.yaml model.name_or_path=$SFT/seed0/checkpoint ${RM_ARGS:-} > $OUT/r/rm.log 2>&1 \
  || { tail -20 $OUT/r/rm.log; exit 1; }
cp runs/rlhf/rm/eval.json $OUT/r/rm-eval.json
grep -h -A4 "held-out pair accuracy" $OUT/r/rm.log
echo "reward model done after $(( $(date +%s) - start )) s"
python3 - "$VARIANTS" <<'EOF'
import os, sys, yaml
base = yaml.safe_load(open("configs/tiny/rlhf/grpo.yaml"))
extra = {"rm": [], "rm_math": [{"name": "math", "weight": 1.0}],
         "rm_length": [{"name": "length", "weight": 0.1, "args": {"part": "thinking"}}]}
for variant in sys.argv[1].split():
    config = yaml.safe_load(yaml.safe_dump(base))
    route = [dict(spec) for spec in config["rewards"]["routes"]["chat"] if spec["name"] == "reward_model"]
    route[0]["args"] |= {"serve": "process", "device": "cuda", **({"normalize": n} if (n := os.environ.get("RM_NORMALIZE")) else {})}
    config["rewards"]["routes"]["chat"] = route + extra[variant]
    yaml.safe_dump(config, open(f"/tmp/grpo-{variant}.yaml", "w"))
EOF
for v in $VARIANTS; do for s in 0 1; do
  OMP_NUM_THREADS=2 timeout ${RUN_LIMIT:-420} align grpo /tmp/grpo-$v.yaml model.name_or_path=$SFT/seed$s/checkpoint \
    train.seed=$s eval.test_path=runs/data/tiny/validation.jsonl output_dir=runs/rlhf/$v/seed$s ${GRPO_ARGS:-} \
    > $OUT/r/grpo-$v-$s.log 2>&1 &
done; done; wait
echo "grpo done after $(( $(date +%s) - start )) s"
for v in $VARIANTS; do for s in 0 1; do
  mkdir -p $OUT/r/$v/seed$s; cp runs/rlhf/$v/seed$s/eval.json runs/rlhf/$v/seed$s/metrics.jsonl $OUT/r/$v/seed$s/ 2>/dev/null
done; done
grep -h "Error" $OUT/r/grpo*.log | cut -c1-200
for s in 0 1; do
  align eval $SFT/seed$s/checkpoint $(for v in $VARIANTS; do echo runs/rlhf/$v/seed$s/checkpoint; done) \
    eval.test_path=runs/data/tiny/test.jsonl eval.reward_model=runs/rlhf/rm/checkpoint eval.max_samples=300 \
    eval.budgets=[null] eval.max_new_tokens=160 eval.batch_size=512 eval.decode=continuous \
    output_dir=runs/rlhf/test-seed$s > $OUT/r/test-$s.log 2>&1 &
done; wait
for s in 0 1; do cp runs/rlhf/test-seed$s/eval.json $OUT/r/test-seed$s.json 2>/dev/null; done
echo "test evaluation done after $(( $(date +%s) - start )) s"
python3 - "$VARIANTS" <<'EOF'
import json, sys
from alignment.eval_stats import paired_difference

def gains(label, before, after):
    """RM scores and math accuracy of `after` against `before`, paired over the same rows, and the toggle."""
    line = [label]
    for key, rows in (("rm_score_think", "row_rm_score_think"), ("rm_score_no_think", "row_rm_score_no_think"),
                      ("accuracy_think", "correct_think")):
        diff, se = paired_difference(before[rows], after[rows])
        line.append(f"{key} {before[key]:.3f} -> {after[key]:.3f} ({diff:+.3f} +- {se:.3f})")
    line.append(f"toggle {before['toggle_compliance']:.3f} -> {after['toggle_compliance']:.3f}")
    print(" | ".join(line))

for variant in sys.argv[1].split():
    for seed in (0, 1):
        try:
            e = json.load(open(f"runs/rlhf/{variant}/seed{seed}/eval.json"))
        except FileNotFoundError:
            print(variant, seed, "no eval.json"); continue
        gains(f"{variant} seed {seed}:", e["before"], e["after"])
print("test split (align eval; SFT model, then the variants in order):")
for seed in (0, 1):
    try:
        models = list(json.load(open(f"runs/rlhf/test-seed{seed}/eval.json")).values())
    except FileNotFoundError:
        print(seed, "no test eval.json"); continue
    for variant, m in zip(sys.argv[1].split(), models[1:]):
        gains(f"test {variant} seed {seed}:", models[0], m)
EOF
