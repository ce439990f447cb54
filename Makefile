# enrich-server: every chore is one target; CI runs `make test` (see .ci/run).
.DEFAULT_GOAL := help
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: help venv run test lint typecheck pytest example-store bench bench-quick bench-micro bench-store \
	bench-deps test-deps debian-packages clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	@touch $(STAMP)

venv: $(STAMP) ## create .venv and install the project (done by every target that needs it)

run: $(STAMP) ## serve the bundled example store on http://127.0.0.1:8080
	$(BIN)/enrich-server serve

test: lint typecheck pytest ## ruff, mypy --strict and the whole pytest suite (with bench smoke runs)

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP) ## mypy --strict over the package, tests and benchmarks
	$(BIN)/mypy

pytest: $(STAMP) test-deps ## the test suite alone
	$(BIN)/pytest

example-store: $(STAMP) ## rebuild segments.lmdb.example from segments.example.tsv
	rm -rf segments.lmdb.example
	$(BIN)/enrich-server load segments.example.tsv --store segments.lmdb.example --quiet
	rm -f segments.lmdb.example/lock.mdb

bench-deps: ## install Debian's wrk and redis-server when missing (root) for bench/ and its smoke tests
	@$(MAKE) --no-print-directory debian-packages PACKAGES="wrk redis-server" COMMANDS="wrk redis-server"

test-deps: bench-deps ## also Debian's prometheus (real Prometheus and promtool in the tests)
	@$(MAKE) --no-print-directory debian-packages PACKAGES="prometheus" COMMANDS="prometheus promtool"

debian-packages:
	@missing=""; for c in $(COMMANDS); do command -v $$c >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(PACKAGES); \
	  else echo "needs Debian's $(PACKAGES): install them or run as root" >&2; exit 1; fi; fi

bench: $(STAMP) bench-deps ## full load benchmark (< 10 min): ceiling vs enrich vs FastAPI+Redis
	$(BIN)/python -m bench.load --profile full
	$(BIN)/python -m bench.micro

bench-quick: $(STAMP) bench-deps ## the same, shorter (< 2 min)
	$(BIN)/python -m bench.load --profile quick

bench-micro: $(STAMP) ## in-process app work per request (decode + lookups + encode), 1M-identity store
	$(BIN)/python -m bench.micro

bench-store: $(STAMP) bench-deps ## the store at 10k/1M/10M identities: build, size, lookups, worker RSS, /enrich (~12 min, ~3 GB; BASELINE=REF also serves REF's 10M build)
	$(BIN)/python -m bench.store --profile full $(if $(BASELINE),--baseline $(BASELINE))

.PHONY: bench-ingest
bench-ingest: $(STAMP) bench-deps ## DMP micro-batches pushed beside /enrich open-loop load, both durabilities (~5 min)
	$(BIN)/python -m bench.ingest --profile full --durability fsync
	$(BIN)/python -m bench.ingest --profile full --durability os

.PHONY: bench-replication
bench-replication: $(STAMP) bench-deps ## 3 nodes + nats-server: propagation, applier, /enrich beside 50k mut/s (~8 min)
	$(BIN)/python -m bench.replication --profile full

.PHONY: bench-hostile
bench-hostile: $(STAMP) ## hostile bodies in-process and through serve, 100k fuzzed bodies, slowloris, atheris (~5 min)
	$(BIN)/python -m bench.hostile --profile full

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache bench/.cache
