#!/usr/bin/env bash
# Everything a lent GPU machine should show, in one call: the CUDA tests (Triton compiled for
# real, sync-free and CUDA-graph checks) and the GPU benchmarks (benchmarks/bench_gpu.py, one
# table). Results go to $OUT (device tool) or ./gpu_out; 240 s of tests + 300 s of benchmarks fit a
# 10-minute device command (TEST_SECONDS, BENCH_SECONDS change them). Carries its peers as wheels
# in .whl/ when present (torchjd, quadprog, qpsolvers).
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -m mmgrad.env | tee -a "$OUT/device.txt"
T=${TEST_SECONDS:-240}
timeout "$T" python3 -m pytest -q -p no:cacheprovider -x \
  tests/test_cuda.py tests/test_triton_backend.py \
  "tests/test_ops.py" "tests/test_aggregators.py" "tests/test_reliability.py" \
  -k "cuda or CUDA or gpu or GPU or sync or triton" 2>&1 | tee "$OUT/tests.txt" | tail -25
B=${BENCH_SECONDS:-300}
[ "$B" = 0 ] && exit 0
# Every benchmark in one script and one table. It starts no new row after --seconds, a minute before
# the timeout, so that its report is written; rows go to bench_gpu.log as they are measured.
timeout "$B" python3 benchmarks/bench_gpu.py --device cuda --seconds $((B > 120 ? B - 60 : B / 2)) \
  --out "$OUT/results_gpu.md" > /dev/null 2> "$OUT/bench_gpu.log" \
  || echo "bench_gpu timed out or failed: see $OUT/bench_gpu.log for the rows measured and the error"
cat "$OUT/results_gpu.md" 2>/dev/null
