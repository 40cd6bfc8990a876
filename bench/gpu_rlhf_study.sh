# RLHF with a trained reward model on the tiny model (README "RLHF with a reward model"), one device call; carry .gpu
# (bench/gpu_env.sh) and SFT=<folder> holding seed{0,1}/checkpoint (carry it too):
#   SFT=.gpu_ckpt bash bench/gpu_rlhf_study.sh
# The synthetic preferences, `align rm` from seed 0's SFT model (held-out pair accuracy), then GRPO against it from
# both seeds' SFT models side by side, each evaluated before and after on the test split (math accuracy and the
# reward model's mean score) -> $OUT/rlhf_results.tgz
set -u
. bench/gpu_env.sh
nvidia-smi --query-gpu=name --format=csv,noheader; date -u; git log --oneline | head -1
start=$(date +%s)
mkdir -p $OUT/r
trap 'tar czf $OUT/rlhf_results.tgz -C $OUT r; rm -rf $OUT/r' EXIT
align data configs/tiny/data.yaml > $OUT/r/data.log 2>&1 || { tail -20 $OUT/r/data.log; exit 1; }
python3 -m data_recipes.synthetic_preferences runs/data/tiny/train.jsonl runs/data/tiny/preferences.jsonl \
  --chat-prompts runs/data/tiny/rl.jsonl runs/data/tiny/chat_rl.jsonl
align rm configs/tiny/rlhf/rm.yaml model.name_or_path=$SFT/seed0/checkpoint > $OUT/r/rm.log 2>&1 \
  || { tail -20 $OUT/r/rm.log; exit 1; }
cp runs/rlhf/rm/eval.json $OUT/r/rm-eval.json
grep -h "held-out pair accuracy" $OUT/r/rm.log
echo "reward model done after $(( $(date +%s) - start )) s"
for s in 0 1; do
  OMP_NUM_THREADS=4 timeout ${RUN_LIMIT:-400} align grpo configs/tiny/rlhf/grpo.yaml model.name_or_path=$SFT/seed$s/checkpoint \
    train.seed=$s output_dir=runs/rlhf/seed$s/grpo > $OUT/r/grpo$s.log 2>&1 &
done; wait
echo "grpo done after $(( $(date +%s) - start )) s"
for s in 0 1; do mkdir -p $OUT/r/seed$s; cp runs/rlhf/seed$s/grpo/eval.json runs/rlhf/seed$s/grpo/metrics.jsonl $OUT/r/seed$s/ 2>/dev/null; done
grep -h "reward model runs\|eval on\|Error" $OUT/r/grpo*.log | cut -c1-200
