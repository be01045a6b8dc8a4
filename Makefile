# The two quick-start commands: `make bench` (the HydraLoRA microbenchmark on this machine's
# device) and `make test`. Both create .venv on first use: torch 2.14.1, the test and tooling
# dependencies, and this package in editable mode (the CUDA extension is built when a CUDA
# toolkit and a CUDA build of torch are present: MTLORA_BUILD_CUDA=auto|1|0).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MTLORA_BUILD_CUDA ?= auto
export CUDA_HOME ?= /usr/local/cuda

.PHONY: bench test benchmarks kernels clean

$(VENV)/.ready: requirements-dev.txt pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1
	$(PY) -m pip install -q -r requirements-dev.txt
	MTLORA_BUILD_CUDA=$(MTLORA_BUILD_CUDA) $(PY) -m pip install -q --no-build-isolation -e .
	touch $@

bench: $(VENV)/.ready
	$(VENV)/bin/mtlora-kernels bench $(ARGS)

test: $(VENV)/.ready
	$(PY) -m pytest tests -q -m "not slow" -p no:cacheprovider --durations=25 $(ARGS)

benchmarks: $(VENV)/.ready
	$(PY) -m pytest benchmarks --benchmark-only $(ARGS)

kernels: $(VENV)/.ready
	$(VENV)/bin/mtlora-kernels kernels $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info bench_out
