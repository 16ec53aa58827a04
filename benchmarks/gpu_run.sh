#!/usr/bin/env bash
# Everything a lent GPU machine should show, in one call: the CUDA tests (Triton compiled for
# real, sync-free and CUDA-graph checks) and the GPU benchmarks. Results go to $OUT (device tool)
# or ./gpu_out. Carries its peers as wheels in .whl/ when present (torchjd, quadprog, qpsolvers).
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
B=${BENCH_SECONDS:-120}
[ "$B" = 0 ] && exit 0
timeout "$B" python3 benchmarks/bench_ops.py --device cuda --out "$OUT/results_gpu.md" > /dev/null 2>&1 || echo "bench_ops timed out or failed"
timeout "$B" python3 benchmarks/bench_aggregators.py --device cuda --K 2 8 64 --P 16e6 --repeat 3 --out "$OUT/results_gpu.md" > /dev/null 2>&1 || echo "bench_aggregators timed out or failed"
timeout "$B" python3 benchmarks/bench_step.py --device cuda --batch 64 --size 112 --out "$OUT/results_gpu.md" > /dev/null 2>&1 || echo "bench_step timed out or failed"
cat "$OUT/results_gpu.md" 2>/dev/null | tail -60
