# Quick start: `make demo` and `make test`. Both create (or reuse) .venv inside the repo.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.14.1 torchvision==0.29.1
CUDA_ARCHS ?= 80;90
export PYTHONUNBUFFERED := 1

.PHONY: venv data demo test test-all test-gpu-stack eval-quick bench kernels clean

$(STAMP): setup.py Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(TORCH)
	$(VPY) -m pip install -q -e '.[dev,gpu]'
	touch $(STAMP)

venv: $(STAMP) data

# Fashion-MNIST comes from Debian's dataset-fashion-mnist; without root/apt the demo
# falls back to scikit-learn's digits and says so.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
	      || echo "note: could not install dataset-fashion-mnist; the demo will use scikit-learn digits"; \
	  else echo "note: not root or no apt; the demo will use scikit-learn digits"; fi; \
	fi

demo: venv
	$(VENV)/bin/spurfast demo --out out/demo --overwrite

test: venv
	$(VPY) -m pytest -q -m "not slow" tests

test-all: venv
	$(VPY) -m pytest -q tests

# The GPU machine's software stack (Python 3.12, torch 2.11, triton 3.6, CuPy, no DALI) on this CPU,
# in a venv of its own: what `make test` runs, to catch what that stack breaks before a GPU is lent
# (pyenv's python3.12 shim refuses to run where 3.12 is not the selected version: its own path then)
STACK_PY  ?= $(shell python3.12 -c '' >/dev/null 2>&1 && echo python3.12 || \
                ls -d $$HOME/.pyenv/versions/3.12*/bin/python3 2>/dev/null | tail -n 1)
STACK_VENV := .venv-gpu-stack
test-gpu-stack:
	@test -n "$(STACK_PY)" || { echo "no Python 3.12 found: make test-gpu-stack STACK_PY=/path/to/python3.12"; exit 1; }
	test -x $(STACK_VENV)/bin/python || $(STACK_PY) -m venv $(STACK_VENV)
	$(STACK_VENV)/bin/python -m pip install -q --upgrade pip 'setuptools<82'
	$(STACK_VENV)/bin/python -m pip install -q torch==2.11.0 torchvision==0.26.0 triton==3.6.0 cupy-cuda13x \
	  numpy scipy scikit-learn matplotlib tqdm pillow pytest pytest-timeout faiss-cpu
	$(STACK_VENV)/bin/python -m pip install -q --no-deps -e .
	$(STACK_VENV)/bin/python -m pytest -q -m "not slow" tests

eval-quick: venv
	$(VENV)/bin/spurfast evaluate --preset quick --out out/eval-quick

bench: venv
	$(VPY) -m bench all --quick

# Ahead-of-time fatbins for the CuPy k-means kernels (needs nvcc + CMake; optional).
kernels:
	cmake -S . -B build/cuda -DCMAKE_CUDA_ARCHITECTURES="$(CUDA_ARCHS)" >/dev/null
	cmake --build build/cuda -j 2

clean:
	rm -rf build out .pytest_cache
