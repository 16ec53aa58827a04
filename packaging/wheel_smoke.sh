#!/usr/bin/env bash
# Install a built mmgrad wheel into a fresh virtual environment and launch every op from it:
#   packaging/wheel_smoke.sh dist/mmgrad-*.whl [torch requirement]
# The wheel's C++ (and, on a GPU machine, CUDA) kernels must load and agree with the float64
# reference (`python -m mmgrad.selftest --require cpp`); an import that works is not enough.
set -euo pipefail
wheel=$(readlink -f "$1")
torch_spec=${2:-torch==2.13.0}
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
"$work/venv/bin/python" -m pip install -q "$torch_spec"
"$work/venv/bin/python" -m pip install -q "$wheel"
cd "$work"  # away from the source tree, so that `import mmgrad` is the installed wheel
"$work/venv/bin/python" - <<'PY'
import os, sys, mmgrad
where = os.path.dirname(mmgrad.__file__)
assert where.startswith(sys.prefix), f"imported mmgrad from {where}, not from the fresh venv {sys.prefix}"
print("mmgrad", mmgrad.__version__, "from", where)
PY
"$work/venv/bin/python" -m mmgrad.env
"$work/venv/bin/python" -m mmgrad.selftest --require cpp
"$work/venv/bin/mmgrad" --version
echo "wheel smoke test passed: $(basename "$wheel")"
