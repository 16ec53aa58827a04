#!/usr/bin/env bash
# Everything a lent GPU machine should show, in one call: the C++/CUDA extension built there
# (against that machine's torch and nvcc: a _C built elsewhere is for another torch), the CUDA
# tests (Triton compiled for real, the CUDA C++ kernels, the Triton solvers, sync-free and
# CUDA-graph checks) and the GPU benchmarks (benchmarks/bench_gpu.py, one table, then the solves
# alone). Results go to $OUT (device tool) or ./gpu_out. On the H100 (2026-11-23): build 73-93 s
# on 16 cores (sm_90 only unless TORCH_CUDA_ARCH_LIST says otherwise), tests 228-249 s with 12
# workers, benchmarks about 70 s; the limits below (self-test 60 s, TEST_SECONDS 255,
# BENCH_SECONDS 120, SOLVER_SECONDS 50) keep the whole within a 10-minute device command
# (BUILD=0 skips the build).
# Carries its peers as wheels in .whl/ when present (torchjd, quadprog, qpsolvers).
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
  # The device image's CC / CXX (/opt/gcc wrappers) link libstdc++ statically into _C, which
  # then segfaults formatting any error message that holds a number (seen 2026-11-23: ldd lists
  # no libstdc++); the distribution's compilers link it dynamically, as torch does.
  if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
  start=$(date +%s)
  if TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} python3 setup.py build_ext --inplace \
      > "$OUT/build.txt" 2>&1; then
    echo "built mmgrad._C in $(( $(date +%s) - start )) s with ${CXX:-the default C++ compiler};" \
      "$(ldd mmgrad/_C*.so | grep -c libstdc++) dynamic libstdc++ dependency" | tee -a "$OUT/device.txt"
  else
    echo "building mmgrad._C FAILED after $(( $(date +%s) - start )) s (the tests and benchmarks" \
      "run without it); the end of build.txt:" | tee -a "$OUT/device.txt"
    tail -30 "$OUT/build.txt"
  fi
fi
python3 -m mmgrad.env | tee -a "$OUT/device.txt"
# What a user runs after installing: every usable backend's core ops against the float64 reference.
timeout 60 python3 -m mmgrad.selftest --require cuda --require triton > "$OUT/selftest.txt" 2>&1
echo "selftest exit status $? ($(grep -E "^selftest:" "$OUT/selftest.txt" || echo "no summary line"))" \
  | tee -a "$OUT/device.txt"
T=${TEST_SECONDS:-255}
# Every test of the files that only run on a GPU, and the CUDA / Triton cases of the others; not
# -x: one run should show every failure.
# Parallel workers (pytest-xdist) when installed: compiling the Triton kernels for real is most of
# the time; a per-test limit (pytest-timeout) keeps one hung test from eating the budget.
PAR=()
python3 -c "import xdist" 2>/dev/null && PAR+=(-n "${TEST_WORKERS:-12}")
python3 -c "import pytest_timeout" 2>/dev/null && PAR+=(--timeout 150)
timeout "$T" python3 -m pytest -v -rfE --durations=15 -p no:cacheprovider "${PAR[@]}" \
  tests/test_cuda.py tests/test_cuda_kernels.py tests/test_triton_solvers.py \
  tests/test_triton_graddrop.py tests/test_triton_backend.py tests/test_ops.py \
  tests/test_aggregators.py \
  tests/test_reliability.py tests/test_philox_uniform.py tests/test_opm.py tests/test_crmt.py \
  -k "cuda or CUDA or gpu or GPU or sync or triton" > "$OUT/tests.txt" 2>&1
# One line per test in tests.txt (a run cut off by the timeout still names what ran); here the
# failures and the summary only.
grep -E "(FAILED|ERROR)|^=+ .*(passed|failed|error)|Fatal Python error|node down" "$OUT/tests.txt" | tail -60
B=${BENCH_SECONDS:-120}
[ "$B" = 0 ] && exit 0
# Every benchmark in one script and one table. It starts no new row after --seconds, a minute before
# the timeout, so that its report is written; rows go to bench_gpu.log as they are measured.
timeout "$B" python3 benchmarks/bench_gpu.py --device cuda --seconds $((B > 120 ? B - 60 : B / 2)) \
  --out "$OUT/results_gpu.md" > /dev/null 2> "$OUT/bench_gpu.log" \
  || echo "bench_gpu timed out or failed: see $OUT/bench_gpu.log for the rows measured and the error"
# The K x K solves alone (weights(G) on full and rank-deficient Grams, slowest of three seeds):
# where the solver kernels stand (2026-11-23: MGDA's Wolfe kernel 20 ms at K = 64).
timeout "${SOLVER_SECONDS:-50}" python3 benchmarks/bench_aggregators.py --device cuda --solvers-only \
  --K 2 8 16 32 64 --repeat 20 --out "$OUT/results_gpu.md" > /dev/null 2>> "$OUT/bench_gpu.log" \
  || echo "bench_aggregators --solvers-only timed out or failed: see $OUT/bench_gpu.log"
cat "$OUT/results_gpu.md" 2>/dev/null
