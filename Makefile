# Two entry points: `make full-pipeline` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.13.0: on CPU-only machines pip takes the local CPU wheel in seconds;
# on GPU machines the same pin resolves to the CUDA build.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup full-pipeline test bench experiments lint clean

setup: $(STAMP)

# torch goes in first, with pip: only pip looks where a CPU machine keeps its local torch wheel
# (pip.conf's find-links). The rest goes in with uv, which resolves and installs in seconds what pip
# takes a minute and more for: uv from PATH, else from PyPI into the venv; pip does it all when
# neither works.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	uv=$$(command -v uv || { $(BIN)/python -m pip install -q uv >/dev/null 2>&1 && echo $(BIN)/uv; }); \
	if [ -n "$$uv" ] && $$uv pip install -q --python $(BIN)/python -e ".[test]"; then :; else \
	  $(BIN)/python -m pip install -q --upgrade pip && $(BIN)/python -m pip install -q -e ".[test]"; fi
	touch $(STAMP)

full-pipeline: setup
	$(BIN)/aligndistil run pipelines/tiny.yaml

test: setup
	$(BIN)/python -m pytest tests

bench: setup
	$(BIN)/python -m bench.run

# Not part of `make test`: seeds x methods x knobs on the embedded task (see docs/RESULTS.md).
experiments: setup
	$(BIN)/aligndistil sweep pipelines/experiments.yaml

lint: setup
	$(BIN)/python -m pip install -q ruff
	$(BIN)/ruff check aligndistil_cli tests

clean:
	rm -rf runs bench/results.json
