#!/usr/bin/env bash
# Everything a lent GPU machine should show, in one call: the C++/CUDA extension built there
# (against that machine's torch and nvcc: a _C built elsewhere is for another torch), the CUDA
# tests (Triton compiled for real, the CUDA C++ kernels, the Triton solvers, sync-free and
# CUDA-graph checks) and the GPU benchmarks (benchmarks/bench_gpu.py, one table). Results go to
# $OUT (device tool) or ./gpu_out. Build (~1-2 min on 16 cores, sm_90 only unless
# TORCH_CUDA_ARCH_LIST says otherwise) + 200 s of tests + 240 s of benchmarks fit a 10-minute
# device command (TEST_SECONDS, BENCH_SECONDS change them; BUILD=0 skips the build). Carries its
# peers as wheels in .whl/ when present (torchjd, quadprog, qpsolvers).
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
if [ "${BUILD:-1}" != 0 ]; then
  start=$(date +%s)
  if TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} python3 setup.py build_ext --inplace \
      > "$OUT/build.txt" 2>&1; then
    echo "built mmgrad._C in $(( $(date +%s) - start )) s" | tee -a "$OUT/device.txt"
  else
    echo "building mmgrad._C FAILED after $(( $(date +%s) - start )) s (the tests and benchmarks" \
      "run without it); the end of build.txt:" | tee -a "$OUT/device.txt"
    tail -30 "$OUT/build.txt"
  fi
fi
python3 -m mmgrad.env | tee -a "$OUT/device.txt"
T=${TEST_SECONDS:-200}
# Every test of the files that only run on a GPU, and the CUDA / Triton cases of the others; not
# -x: one run should show every failure.
timeout "$T" python3 -m pytest -q -p no:cacheprovider \
  tests/test_cuda.py tests/test_cuda_kernels.py tests/test_triton_solvers.py \
  tests/test_triton_graddrop.py tests/test_triton_backend.py tests/test_ops.py \
  tests/test_aggregators.py \
  tests/test_reliability.py tests/test_philox_uniform.py tests/test_opm.py tests/test_crmt.py \
  -k "cuda or CUDA or gpu or GPU or sync or triton" 2>&1 | tee "$OUT/tests.txt" | tail -40
B=${BENCH_SECONDS:-240}
[ "$B" = 0 ] && exit 0
# Every benchmark in one script and one table. It starts no new row after --seconds, a minute before
# the timeout, so that its report is written; rows go to bench_gpu.log as they are measured.
timeout "$B" python3 benchmarks/bench_gpu.py --device cuda --seconds $((B > 120 ? B - 60 : B / 2)) \
  --out "$OUT/results_gpu.md" > /dev/null 2> "$OUT/bench_gpu.log" \
  || echo "bench_gpu timed out or failed: see $OUT/bench_gpu.log for the rows measured and the error"
cat "$OUT/results_gpu.md" 2>/dev/null
