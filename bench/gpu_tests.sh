#!/usr/bin/env bash
# The whole fast test suite on the lent GPU machine, with the Mamba kernels on the path, in one device call:
#   bash bench/gpu_tests.sh [seconds] [workers] [tests...]   (carry .gpu; results in $OUT/junit.xml, $OUT/tests.log)
# The CUDA-path tests are the long ones there (minutes each under load, probably first-call Triton autotuning):
# idle workers take queued tests from busy ones (worksteal). Stopped with SIGINT before the limit, pytest still
# writes its summary and junit file.
. bench/gpu_env.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/test/*.whl 2>/dev/null
seconds=${1:-540} workers=${2:-8}; shift 2 2>/dev/null
timeout -s INT "$seconds" python3 -m pytest "${@:-tests}" -m "not slow" -o addopts="" -p no:cacheprovider \
  -n "$workers" --dist worksteal -q -rfEs --tb=short --durations=25 --junitxml="$OUT/junit.xml" > "$OUT/tests.log" 2>&1
echo "pytest rc=$?" >> "$OUT/tests.log"
grep -v "^\s*$" "$OUT/tests.log" | tail -60
