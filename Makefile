# The README's two commands: `make demo` and `make test`. Both work on a bare machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast test-gpu bench install clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A CUDA machine keeps the torch it has; elsewhere take the CPU wheel.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m relora_ds demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

# The edit loop (under 90 s on 2 cores): unit and kernel tests, no training runs, ranks or child processes
# (tests/e2e and tests/distributed are marked slow by tests/conftest.py; the few unit tests that train or spawn, by hand).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not gpu and not slow"

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

bench: $(STAMP)
	$(PY) benchmarks/kernel_bench.py

clean:
	rm -rf $(VENV) build *.egg-info

# One command for every GPU check (benchmarks/gpu_check.sh; benchmarks/README.md, "GPU check"): on a CUDA
# machine, with the machine's python (PYTHON) and the wheels in .whl/, never the .venv above.
.PHONY: gpu-check gpu-check-dry-run
gpu-check:
	PYTHON="$(PYTHON)" bash benchmarks/gpu_check.sh

gpu-check-dry-run:
	PYTHON="$(PYTHON)" bash benchmarks/gpu_check.sh --dry-run
