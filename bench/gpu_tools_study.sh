# Tool calling on the tiny model (README "Tool calling"): data with tool tasks, SFT (math + unpacked tool rows, 400
# steps as in the demo) and DPO with mined tool pairs, two seeds side by side; results in $OUT/results.tgz.
# Carry .gpu (bench/gpu_env.sh).
mkdir -p $OUT/r
trap 'for s in 0 1; do for st in sft dpo; do mkdir -p $OUT/r/seed$s/$st; cp runs/tools/seed$s/$st/eval.json runs/tools/seed$s/$st/metrics.jsonl $OUT/r/seed$s/$st/ 2>/dev/null; done; cp -r runs/tools/seed$s/dpo/pairs $OUT/r/seed$s/dpo/ 2>/dev/null; done; tar czf $OUT/results.tgz -C $OUT r; rm -rf $OUT/r' EXIT
. bench/gpu_env.sh
nvidia-smi --query-gpu=name --format=csv,noheader; date -u; git log --oneline | head -1
start=$(date +%s)
align data configs/tiny/data.yaml > $OUT/r/data.log 2>&1 || { tail -20 $OUT/r/data.log; exit 1; }
for s in 0 1; do
  OMP_NUM_THREADS=4 align sft configs/tiny/tools/sft.yaml train.max_steps=400 train.seed=$s model.init_seed=$s \
    output_dir=runs/tools/seed$s/sft > $OUT/r/sft$s.log 2>&1 &
done; wait
echo "sft done after $(( $(date +%s) - start )) s"; grep -h "tool episodes on\|^accuracy" $OUT/r/sft*.log
for s in 0 1; do
  OMP_NUM_THREADS=4 align dpo configs/tiny/tools/dpo.yaml model.name_or_path=runs/tools/seed$s/sft/checkpoint train.seed=$s \
    output_dir=runs/tools/seed$s/dpo > $OUT/r/dpo$s.log 2>&1 &
done; wait
echo "dpo done after $(( $(date +%s) - start )) s"; grep -h "tool episodes on\|round .: .* pairs\|keeping\|Error" $OUT/r/dpo*.log | cut -c1-400
