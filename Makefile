# Two entry points: `make full-pipeline` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.13.0: on CPU-only machines pip takes the local CPU wheel in seconds;
# on GPU machines the same pin resolves to the CUDA build.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup full-pipeline test bench experiments experiments-full lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

full-pipeline: setup
	$(BIN)/aligndistil run pipelines/tiny.yaml

test: setup
	$(BIN)/python -m pytest tests

bench: setup
	$(BIN)/python -m bench.run

# Not part of `make test`: seeds x methods x knobs x training budgets on the embedded task (docs/RESULTS.md).
# On a machine shared with other jobs, OMP_NUM_THREADS=1 avoids thread oversubscription.
experiments: setup
	$(BIN)/aligndistil sweep pipelines/experiments.yaml

# The full grid of issue 13 (5 seeds, lr x epochs 3 x 3, every r and w): hours on 2 cores.
experiments-full: setup
	$(BIN)/aligndistil sweep pipelines/experiments-full.yaml

lint: setup
	$(BIN)/python -m pip install -q ruff
	$(BIN)/ruff check aligndistil_cli tests

clean:
	rm -rf runs bench/results.json
