# fedrun's entry points. `make demo` and `make test` work on a fresh machine: both set up
# .venv first (torch pinned and installed before everything else, see FACTS.md).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup demo demo-real test test-unit test-e2e lint typecheck format crds bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and exactly pinned: any other spec pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[operator,trainer,dev]'
	touch $(STAMP)

## demo: a real federated run on this machine (3 hospitals, synthetic stroke-like data, ε=1)
demo: setup
	$(BIN)/fedrun demo-data out/demo-data
	$(BIN)/fedrun local examples/federatedrun-local.yaml --out out/demo

## demo-real: the same run on the real Kaggle stroke data in ../shared/data/stroke
demo-real: setup
	$(BIN)/fedrun demo-data out/real-data --real ../shared/data/stroke/healthcare-dataset-stroke-data.csv
	$(BIN)/fedrun local examples/federatedrun-local.yaml --out out/real --data-dir out/real-data

## test: lint, types, and every test tier that can run on this machine
test: setup lint typecheck
	$(BIN)/pytest -q

test-unit: setup
	$(BIN)/pytest -q tests/unit

test-e2e: setup
	$(BIN)/pytest -q tests/e2e

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: setup
	$(BIN)/mypy

## crds: regenerate crds/federatedrun.yaml from the API models
crds: setup
	$(BIN)/python -m fedrun_operator.crd > crds/federatedrun.yaml

## bench: round overhead vs the compute floor, DP step cost, AUROC on real data
bench: setup
	$(BIN)/python -m tests.benchmarks.run --out docs/benchmarks.md

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
