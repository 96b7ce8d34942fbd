# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
# Both create or refresh .venv/ (pip: it finds the local torch wheels) and are idempotent.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db

.PHONY: setup test test-fast test-slow demo clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,s3,team,local]'
	touch $(STAMP)

setup: $(STAMP)

# Layers (import-linter contracts in pyproject.toml), lint and format checks fail the target before any test runs.
# Tests never download weights (HF_HUB_OFFLINE=1 here and in tests/conftest.py); users keep their network,
# so that `profile: paper` (ImageNet encoder) fetches its weights once.
test: setup
	$(BIN)/lint-imports
	$(BIN)/ruff check platform tests benchmarks scripts
	$(BIN)/ruff format --check platform tests benchmarks scripts
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra -n 2 --dist loadgroup

# The default suite runs on two pytest-xdist workers (the tests that start Ray all on one of them): 5 min
# on the 2-core machine. The slow suites (`-m slow`, .ci/run) run one file at a time, serially.
# The pure-Python rooms (no Ray, no servers): the loop while editing them, under a minute.
test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 tests/core tests/data tests/model

test-slow: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra -m slow

demo: setup
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/demo.sh

clean:
	rm -rf $(VENV) ray_results mlflow.db mlartifacts data/store.zarr metrics logs
