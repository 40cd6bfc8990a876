# The budget study (make budget-study, README "Budget control that pays") on the GPU machine: seeds and models in
# parallel (make -j4), results packed into $OUT/results.tgz. Carry .gpu (bench/gpu_env.sh).
mkdir -p $OUT/r; trap 'cp -r runs/budget/report.md runs/budget/budget_study.json runs/budget/budget_curve.png $OUT/r/ 2>/dev/null; for s in 0 1; do mkdir -p $OUT/r/seed$s; cp runs/budget/seed$s/eval/eval.json runs/budget/seed$s/eval/report.md $OUT/r/seed$s/ 2>/dev/null; done; tar czf $OUT/results.tgz -C $OUT r; rm -rf $OUT/r' EXIT
. bench/gpu_env.sh
mkdir -p .venv && touch .venv/.installed  # the machine python, set up by gpu_env.sh, stands for the venv
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
start=$(date +%s)
OMP_NUM_THREADS=4 timeout 540 make -j4 budget-study ALIGN="python3 -m alignment.cli" > $OUT/r/study.log 2>&1; echo "make rc $? after $(( $(date +%s) - start )) s"
grep -E "^(accuracy|eval:|step)" $OUT/r/study.log | tail -5; tail -40 runs/budget/report.md
