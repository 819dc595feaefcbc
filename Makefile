# Two commands for a fresh machine with Python 3.11: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check

# `make run` is the development setup: SQLite under ./data and keys generated there.
export CONNECTORS_DEV_KEYS ?= true

.PHONY: run test lint format install install-dev bench bench-scale bench-scale-postgresql bench-outage bench-memory bench-neighbours bench-servers bench-all clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: requirements.lock pyproject.toml | $(BIN)/python
	$(PIP) install -q -r requirements.lock
	$(PIP) install -q --no-deps -e .
	touch $@

$(VENV)/.dev: requirements-dev.lock pyproject.toml clients/python/pyproject.toml | $(BIN)/python
	$(PIP) install -q -r requirements-dev.lock
	$(PIP) install -q --no-deps -e .
	$(PIP) install -q --no-deps -e clients/python
	touch $@ $(VENV)/.runtime

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

run: install
	$(BIN)/python -m app migrate
	exec $(BIN)/python -m app serve

# One pytest worker per core (pytest-xdist); each has its own PostgreSQL database and servers. The
# OpenAPI fuzz test runs in a process of its own, after: the scenarios it draws depend on what
# ran before it in its process, which a worker does not fix.
test: install-dev
	$(BIN)/python -m pytest -n auto --dist worksteal --ignore=tests/test_openapi_fuzz.py
	$(BIN)/python -m pytest tests/test_openapi_fuzz.py

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

format: install-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Benchmarks (see benchmarks/authorize.py): the server pinned to core 0, the load generator to core 1.
# BENCH_ARGS passes options through, e.g. `make bench BENCH_ARGS="--json"`.
bench: install-dev
	$(BIN)/python -m benchmarks.authorize --mode warm $(BENCH_ARGS)

bench-scale: install-dev
	$(BIN)/python -m benchmarks.authorize --mode scale --database sqlite $(BENCH_ARGS)

bench-scale-postgresql: install-dev
	$(BIN)/python -m benchmarks.authorize --mode scale --database postgresql $(BENCH_ARGS)

bench-outage: install-dev
	$(BIN)/python -m benchmarks.authorize --mode outage $(BENCH_ARGS)

# What organization A sees while organization B attacks, one attack at a time (benchmarks/neighbours.py).
bench-neighbours: install-dev
	$(BIN)/python -m benchmarks.neighbours $(BENCH_ARGS)

# uvicorn and granian side by side, then serve --workers 2 (benchmarks/servers.py).
bench-servers: install-dev
	$(BIN)/python -m benchmarks.servers $(BENCH_ARGS)

# Bytes per entry of authorize's caches, measured in-process with tracemalloc (benchmarks/memory.py).
bench-memory: install-dev
	$(BIN)/python -m benchmarks.memory $(BENCH_ARGS)

bench-all: bench bench-scale bench-scale-postgresql bench-outage

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
