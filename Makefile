# InstructRec Stream — developer entry points. `make demo` and `make test` work from a fresh clone.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
# The stamp records that the venv matches pyproject.toml; a new pyproject re-runs the install.
STAMP := $(VENV)/.installed
INSTRUCTREC := $(BIN)/instructrec

# Nothing may wait on a Hugging Face hub that cannot be reached: models load by local path.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: help venv test lint demo demo-quick clean

help:
	@echo "make venv   create or refresh $(VENV) (torch $(TORCH_VERSION) CPU first, then the project)"
	@echo "make test   run the whole test suite (starts and stops its own broker, Triton, Qdrant)"
	@echo "make lint   ruff check, ruff format --check, the architecture contract (lint-imports)"
	@echo "make demo   the whole system live on ml-latest-small (about 15 minutes; demo-quick: about 5)"
	@echo "make clean  stop the local infrastructure and remove state and caches (keeps $(VENV))"

venv: $(STAMP)

# torch goes in first and is pinned by a constraints file for every later install: the CPU wheel comes
# from the local wheelhouse, and pip must never resolve another (CUDA) build as a dependency.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints.txt "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints.txt -e '.[dev]'
	touch $@

test: venv
	$(BIN)/python -m pytest -q tests/

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-logo

# The whole system live (instructrec/infra/demo/): it stops everything it started, also on Ctrl-C.
demo: venv
	$(INSTRUCTREC) demo

demo-quick: venv
	$(INSTRUCTREC) demo --quick

clean:
	if [ -x $(INSTRUCTREC) ]; then $(INSTRUCTREC) infra down; fi
	rm -rf .state .pytest_cache .ruff_cache .hypothesis build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
