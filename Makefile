# The two commands of the README: `make run` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-ray test-tf check lint typecheck unit clean bench bench-quick bench-fleet

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.examples: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[examples]'
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.examples

## Start the server on http://127.0.0.1:8888 (SQLite in ./.cortex) with the example API deployed.
run: $(VENV)/.examples
	scripts/run.sh

## Lint, type-check and run the whole test suite (the dashboard's browser tests need `chromium`).
test: $(VENV)/.test lint typecheck
	@command -v chromium >/dev/null 2>&1 || echo "make test: no chromium on PATH: the dashboard's \
	browser tests (tests/browser) are SKIPPED; apt-get install chromium chromium-driver runs them"
	$(BIN)/pytest

$(VENV)/.ray: pyproject.toml | $(VENV)/.test
	$(BIN)/pip install -q -e '.[test,ray]'
	touch $@

## The Ray launcher's tests on a two-node Ray cluster started on loopback (slow: about 2 min).
test-ray: $(VENV)/.ray
	CORTEX_TEST_RAY=1 $(BIN)/pytest tests/ray

## The TensorFlow predictor's tests: they build an environment with tensorflow-cpu (large).
test-tf: $(VENV)/.test
	CORTEX_TEST_TF=1 $(BIN)/pytest tests/tf

lint: $(VENV)/.test
	$(BIN)/ruff check src tests examples bench
	$(BIN)/ruff format --check src tests examples bench

typecheck: $(VENV)/.test
	$(BIN)/mypy

check: test

$(VENV)/.bench: pyproject.toml | $(VENV)/.test
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

## Measure the service's overhead against the limit (bench/README.md): 3 runs, or 1 quick run.
## W5 (a real model against the limit and Ray Data) needs the `bench` extra, installed here.
bench: $(VENV)/.bench
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/w5.py --write

bench-quick: $(VENV)/.test
	$(BIN)/python bench/bench.py --quick

## Simulated workers (threads speaking the worker protocol) against SQLite and PostgreSQL with
## 1 and 2 replicas: throughput, latencies and CPU per request (bench/README.md, docs/scale.md).
bench-fleet: $(VENV)/.bench
	$(BIN)/python bench/fleet.py --per-batch

clean:
	rm -rf $(VENV) .cortex .pytest_cache .mypy_cache .ruff_cache
