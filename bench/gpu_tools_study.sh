# Tool calling on the tiny model (README "Tool calling"), two seeds side by side on one GPU machine; carry .gpu
# (bench/gpu_env.sh). Two phases, one device call each:
#   PHASE=sft bash bench/gpu_tools_study.sh  SFT recipes, judged on the validation splits:
#       math  configs/tiny/sft.yaml (math only, the demo's SFT)
#       mixed configs/tiny/tools/sft.yaml (math and unpacked tool rows from the start)
#       staged configs/tiny/tools/sft_after_math.yaml (a tool stage from the math checkpoint, math replayed)
#     -> $OUT/sft_results.tgz (eval.json, metrics, logs), $OUT/ckpt_{mixed,staged}.tgz (both seeds' checkpoints);
#     MIXED=0 leaves the mixed recipe out
#   PHASE=rl SFT=.gpu_ckpt bash bench/gpu_tools_study.sh  DPO with mined tool pairs and GRPO with tool episodes
#     from $SFT/seed{0,1}/checkpoint (carry that folder too), each evaluated on the test splits
#     (GRPO's `before` is the SFT model on the same rows) -> $OUT/rl_results.tgz
#   PHASE=dpo_lr SFT=.gpu_ckpt bash bench/gpu_tools_study.sh  DPO's learning rate (LRS) chosen on the validation
#     splits, the chosen one evaluated on the test splits -> $OUT/dpo_lr_results.tgz; DPO_ARGS: more overrides
#     (e.g. DPO_ARGS=mining.temperature=0.7)
set -u
. bench/gpu_env.sh
nvidia-smi --query-gpu=name --format=csv,noheader; date -u; git log --oneline | head -1
start=$(date +%s)
mkdir -p $OUT/r
align data configs/tiny/data.yaml > $OUT/r/data.log 2>&1 || { tail -20 $OUT/r/data.log; exit 1; }
VALIDATION="eval.test_path=runs/data/tiny/validation.jsonl eval.tool_test_path=runs/data/tiny/tools_validation.jsonl eval.max_samples=200"
keep() {  # keep(run dir, name): what comes back of a run
  mkdir -p $OUT/r/$2; cp $1/eval.json $1/metrics.jsonl $OUT/r/$2/ 2>/dev/null; cp -r $1/pairs $OUT/r/$2/ 2>/dev/null; true
}
if [ "${PHASE:-sft}" = sft ]; then
  trap 'tar czf $OUT/sft_results.tgz -C $OUT r; rm -rf $OUT/r' EXIT
  for s in 0 1; do
    seed="train.seed=$s model.init_seed=$s"
    OMP_NUM_THREADS=2 align sft configs/tiny/sft.yaml $seed $VALIDATION output_dir=runs/tools/seed$s/math \
      > $OUT/r/math$s.log 2>&1 &
    [ "${MIXED:-1}" = 1 ] && OMP_NUM_THREADS=2 align sft configs/tiny/tools/sft.yaml $seed $VALIDATION \
      output_dir=runs/tools/seed$s/mixed > $OUT/r/mixed$s.log 2>&1 &
  done; wait
  echo "math and mixed SFT done after $(( $(date +%s) - start )) s"
  for s in 0 1; do
    OMP_NUM_THREADS=2 align sft configs/tiny/tools/sft_after_math.yaml train.seed=$s $VALIDATION \
      model.name_or_path=runs/tools/seed$s/math/checkpoint output_dir=runs/tools/seed$s/staged > $OUT/r/staged$s.log 2>&1 &
  done; wait
  echo "staged SFT done after $(( $(date +%s) - start )) s"
  for s in 0 1; do for r in math mixed staged; do keep runs/tools/seed$s/$r seed$s-$r; done; done
  for r in mixed staged; do
    [ -d runs/tools/seed0/$r/checkpoint ] || continue
    tar czf $OUT/ckpt_$r.tgz -C runs/tools seed0/$r/checkpoint seed1/$r/checkpoint
  done
  grep -h "tool episodes on\|^accuracy" $OUT/r/*.log
elif [ "$PHASE" = dpo_lr ]; then
  # DPO's learning rate for the tool pairs, chosen on the validation splits (mean tool success, reasoning on, over
  # both seeds); the chosen rate's checkpoints are then evaluated once on the test splits.
  trap 'tar czf $OUT/dpo_lr_results.tgz -C $OUT r; rm -rf $OUT/r' EXIT
  for lr in ${LRS:-5e-5 2e-4}; do for s in 0 1; do
    OMP_NUM_THREADS=3 timeout ${RUN_LIMIT:-300} align dpo configs/tiny/tools/dpo.yaml model.name_or_path=$SFT/seed$s/checkpoint \
      train.seed=$s train.lr=$lr ${DPO_ARGS:-} $VALIDATION \
      selection.validation_path= selection.tool_validation_path= output_dir=runs/tools/seed$s/dpo-lr$lr > $OUT/r/dpo$s-lr$lr.log 2>&1 &
  done; done; wait
  echo "dpo variants done after $(( $(date +%s) - start )) s"
  for d in runs/tools/seed*/dpo-lr*; do keep $d $(basename $(dirname $d))-$(basename $d); done
  best=$(python3 -c "
import json, sys
lrs = sys.argv[1].split()
mean = {lr: sum(json.load(open(f'runs/tools/seed{s}/dpo-lr{lr}/eval.json'))['tools']['success_think'] for s in (0, 1)) / 2
        for lr in lrs}
print(mean, file=sys.stderr); print(max(lrs, key=lambda lr: mean[lr]))" "${LRS:-5e-5 2e-4}")
  echo "chosen on validation: lr $best"
  for s in 0 1; do
    OMP_NUM_THREADS=3 timeout ${EVAL_LIMIT:-120} align eval runs/tools/seed$s/dpo-lr$best/checkpoint --config configs/tiny/eval.yaml \
      eval.tool_test_path=runs/data/tiny/tools_test.jsonl eval.budgets=[null] eval.max_new_tokens=160 output_dir=runs/tools/seed$s/dpo-test \
      > $OUT/r/dpo-test$s.log 2>&1 &
  done; wait
  for s in 0 1; do keep runs/tools/seed$s/dpo-test seed$s-dpo-test-lr$best; done
  grep -h "tool episodes on" $OUT/r/*.log | cut -c1-300
else
  trap 'tar czf $OUT/rl_results.tgz -C $OUT r; rm -rf $OUT/r' EXIT
  for s in 0 1; do
    start_model=model.name_or_path=$SFT/seed$s/checkpoint
    # Each run stops itself before the device call's limit, so what the others wrote still comes back.
    OMP_NUM_THREADS=3 timeout ${RUN_LIMIT:-500} align dpo configs/tiny/tools/dpo.yaml $start_model train.seed=$s \
      output_dir=runs/tools/seed$s/dpo > $OUT/r/dpo$s.log 2>&1 &
    OMP_NUM_THREADS=3 timeout ${RUN_LIMIT:-500} align grpo configs/tiny/tools/grpo.yaml $start_model train.seed=$s \
      output_dir=runs/tools/seed$s/grpo > $OUT/r/grpo$s.log 2>&1 &
  done; wait
  echo "dpo and grpo done after $(( $(date +%s) - start )) s"
  for s in 0 1; do for r in dpo grpo; do keep runs/tools/seed$s/$r seed$s-$r; done; done
  grep -h "tool episodes on\|^accuracy\|round .: .* pairs\|keeping\|Error\|before:\|after:" $OUT/r/*.log | cut -c1-300
fi
