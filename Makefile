# Quick start on a fresh Debian bookworm machine (root or sudo):
#   make run    install what is needed, bring PostgreSQL + sidecar + Kamailio up on loopback
#   make test   install what is needed, lint, type-check, run the test suite
#   make run-cluster  the same with two Kamailio nodes, two sidecars and a
#               PostgreSQL formation with failover (pg_auto_failover)
#   make stop   stop what `make run` or `make run-cluster` started
SHELL := /bin/bash
VENV  := .venv
# Touched after a successful `pip install`; redone when pyproject.toml is newer.
STAMP := $(VENV)/.deps-installed

.PHONY: deps system test lint run run-cluster stop bench clean

deps: system $(STAMP)

# Idempotent: installs only missing Debian packages, builds http_async_client once.
system:
	scripts/install-system.sh

# `| system`: order-only, so apt runs before the venv is made but a phony
# target does not force a reinstall every time.
$(STAMP): pyproject.toml | system
	@echo "==> creating $(VENV) and installing the sidecar with its test extras" >&2
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

lint: deps
	$(VENV)/bin/ruff check sidecar tests
	$(VENV)/bin/mypy sidecar

# pytest starts what it needs (a private PostgreSQL via scripts/pgcluster.sh
# when DATABASE_URL is unset, Kamailio, the sidecar); nothing is started here.
test: deps
	$(VENV)/bin/ruff check sidecar tests
	$(VENV)/bin/mypy sidecar
	$(VENV)/bin/pytest -q

run: deps
	scripts/run.sh

run-cluster: deps
	scripts/run-cluster.sh

stop:
	scripts/stop.sh

# The sidecar alone over HTTP (bench/bench_admission.py, ~1.5 min), then the SIP
# side-by-side run, native dialog-profile Kamailio vs the project
# (bench/bench_compare.py, ~5-8 min). Each starts and stops its own PostgreSQL,
# sidecar and Kamailio on free ports. `make bench QUICK=1`: about a minute each.
bench: deps
	rc=0; \
	$(VENV)/bin/python bench/bench_admission.py $(if $(QUICK),--quick) || rc=1; \
	$(VENV)/bin/python bench/bench_compare.py $(if $(QUICK),--quick) || rc=1; \
	exit $$rc

# Only the runtime state (.run); stops what runs from it first.
clean: stop
	rm -rf .run
