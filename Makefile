# The README's two commands: `make demo` and `make test`. Both install into .venv first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2
export DS_ACCELERATOR ?= cpu

.PHONY: install demo test test-heavy bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pin torch first: an unpinned torch would download several GB of CUDA wheels.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dali,dev,onnx]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python launcher/search.py --config configs/search/demo.yaml --run-dir runs/demo --force

test: $(STAMP)
	$(BIN)/python -m pytest -q --timeout 900 tests

test-heavy: $(STAMP)
	$(BIN)/python -m pytest -q --timeout 3600 -m heavy tests

bench: $(STAMP)
	$(BIN)/python benchmarks/supernet_step.py
	$(BIN)/python benchmarks/data_throughput.py

clean:
	rm -rf runs .pytest_cache
