# make demo / make test / make bench: each installs what it needs first (a virtualenv with
# the package, and redis-server / PostgreSQL from the system's package manager if missing).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PEERS_STAMP := $(VENV)/.installed-peers

.PHONY: install system-deps lint format test bench bench-baseline chaos demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

$(PEERS_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,peers]'
	touch $(PEERS_STAMP)

system-deps:
	@scripts/install-system-deps.sh

install: system-deps $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: install lint
	$(BIN)/pytest $(PYTEST_ARGS)

# --peers also measures Debezium beside ours: the peers extra and a Java 17 runtime,
# installed only then.
bench: install
ifneq ($(filter --peers,$(BENCH_ARGS)),)
	@scripts/install-system-deps.sh --peers
	@$(MAKE) --no-print-directory $(PEERS_STAMP)
endif
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# bench/baseline.json, which every bench run is compared with, from the latest run
# (bench/results/latest.json); refuses a --quick, --drain-only or one-mode run unless
# BASELINE_ARGS=--force. Commit it with the change that moved the figures.
bench-baseline: $(STAMP)
	$(BIN)/python bench/baseline.py $(BASELINE_ARGS)

# Readers, writers and faults for a long while, then every cached key against the
# database: prints each round and a table, exits 1 if any key is stale or a round lost probes.
# CHAOS_ARGS=--staleness: quiet runs measuring the stale-set race instead (per listener
# setting and reader slowness; tests/support/staleness.py), one table, exits 1 past issue 15's bounds.
chaos: install
	$(BIN)/python -m tests.chaos $(CHAOS_ARGS)

demo: install
	$(BIN)/cdc-invalidator demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info src/*.egg-info
