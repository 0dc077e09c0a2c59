# Entry points. Each target sets itself up on a fresh machine: a virtualenv in .venv, the
# pinned packages of requirements.txt and, when the venv has no torch yet, $(TORCH_SPEC)
# (the CPU build torch==2.13.0 that pip finds locally). GPU users: install a CUDA torch into
# .venv first (`python3 -m venv .venv && .venv/bin/pip install torch`), or run
# `make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" setup`.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

.PHONY: setup demo test clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH_SPEC)
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --cores all

test: $(STAMP)
	$(BIN)/python -m pytest tests

clean:
	rm -rf results logs benchmarks resources .snakemake
