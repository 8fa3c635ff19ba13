# Two entry points: `make full-pipeline` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.13.0: on CPU-only machines pip takes the local CPU wheel in seconds;
# on GPU machines the same pin resolves to the CUDA build.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# uv installs no bytecode, and where PYTHONDONTWRITEBYTECODE is set Python writes none either: every process
# (each test's CLI run, each pipeline) would compile torch's, transformers' and our modules anew, about 6.7 s
# of a 4.5 s import. One import when the test extra is installed writes the bytecode of what the stages load
# (`make full-pipeline` is one process: there it would only move those seconds into set-up).
# Imported after torch and transformers (sympy by transformers through torch.distributed), compiled without them.
LATER_IMPORTS := sympy, datasets, matplotlib.pyplot
define WARM_BYTECODE
import importlib, pkgutil, aligndistil_cli
for m in pkgutil.walk_packages(aligndistil_cli.__path__, "aligndistil_cli."):
    m.name.endswith("__main__") or importlib.import_module(m.name)
import $(LATER_IMPORTS), transformers.models.llama.modeling_llama, transformers.models.qwen2.modeling_qwen2
endef
export WARM_BYTECODE

# uv installs in seconds what pip takes minutes for: uv from PATH, else from PyPI into the venv by the system's
# pip (a venv made without pip costs 0.1 s, ensurepip 3.5 s; uv puts pip in with the rest). uv does not read pip's
# configuration, so it is handed pip's find-links, where a CPU machine keeps its local torch wheel; TORCH's pin is
# part of the same install. When uv is unavailable or fails, pip does it all, torch first, as before.
# $(1): what to install besides torch.
define INSTALL
	test -x $(BIN)/python || $(PYTHON) -m venv --without-pip $(VENV)
	uv=$$(command -v uv || { { test -x $(BIN)/uv || $(PYTHON) -m pip --python $(BIN)/python install -q uv; } \
	    >/dev/null 2>&1 && echo $(BIN)/uv; }); \
	links=$${PIP_FIND_LINKS:-$$($(PYTHON) -m pip config get global.find-links 2>/dev/null)}; \
	if [ -n "$$uv" ] && $$uv pip install -q --python $(BIN)/python $${links:+--find-links $$links} \
	    "$(TORCH)" pip -e "$(1)"; then :; else \
	  { $(BIN)/python -m pip --version >/dev/null 2>&1 || $(BIN)/python -m ensurepip >/dev/null; } && \
	  $(BIN)/python -m pip install -q --upgrade pip && \
	  { $(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"; } && \
	  $(BIN)/python -m pip install -q -e "$(1)"; fi
endef

.PHONY: setup setup-test full-pipeline test bench experiments experiments-full results lint clean

# The package alone: what `make full-pipeline` needs. The test extra (pytest, ruff, lm-eval, a real
# tokenizer...) comes on top of it for `make test` and `make lint`.
setup: $(STAMP)
setup-test: $(TEST_STAMP)

$(STAMP): pyproject.toml
	$(call INSTALL,.)
	rm -f $(VENV)/.bytecode
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(call INSTALL,.[test])
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -c "$$WARM_BYTECODE"
	touch $(TEST_STAMP)

# Its first stage imports torch and transformers on one core, compiling them (no bytecode yet, see above); meanwhile
# the other core compiles what later stages import, once, so that they do not (about 7 s of a fresh clone's run).
full-pipeline: setup
	@test -f $(VENV)/.bytecode || { env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -c \
	    "import $(LATER_IMPORTS)" && touch $(VENV)/.bytecode; } >/dev/null 2>&1 & \
	echo $(BIN)/aligndistil run pipelines/tiny.yaml; \
	$(BIN)/aligndistil run pipelines/tiny.yaml; rc=$$?; wait; exit $$rc

test: setup-test
	$(BIN)/python -m pytest tests

bench: setup
	$(BIN)/python -m bench.run

# Not part of `make test`: whole-pipeline seeds x methods x knobs on the embedded task (docs/RESULTS.md), two
# seeds at a time, one thread each (a second busy thread per process would oversubscribe 2 cores).
experiments: setup
	OMP_NUM_THREADS=1 $(BIN)/aligndistil sweep pipelines/experiments.yaml --jobs 2

# The published numbers (docs/RESULTS.md, README.md's results block, docs/results/summary.json) from the finished
# `make experiments` and `make full-pipeline`; tests/unit/test_results_docs.py checks the docs against them.
results: setup
	$(BIN)/aligndistil results

# The full grid of issue 13 (5 seeds, lr x epochs 3 x 3, every r and w): hours on 2 cores.
experiments-full: setup
	$(BIN)/aligndistil sweep pipelines/experiments-full.yaml

lint: setup-test
	$(BIN)/ruff check aligndistil_cli tests bench
	$(BIN)/lint-imports

clean:
	rm -rf runs bench/results.json
