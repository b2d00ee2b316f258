# The two front-door commands: `make lab` and `make test`. Both bootstrap everything they need
# (Debian packages, .venv, the package itself) and are safe to run again.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: all lab test lint typecheck bench chaos bootstrap clean lab-down

all: test

bootstrap:
	@bash deploy/bootstrap.sh test,dev

test: bootstrap
	$(VENV)/bin/ruff check meshnet tests bench
	$(VENV)/bin/mypy --strict meshnet
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check meshnet tests bench

typecheck: bootstrap
	$(VENV)/bin/mypy --strict meshnet

lab: bootstrap
	$(PY) -m meshnet.lab.walkthrough

lab-down: bootstrap
	$(VENV)/bin/meshnet-lab down

bench: bootstrap
	@set -e; for b in bench/*.py; do [ $$b = bench/chaos.py ] && continue; echo "== $$b"; $(PY) $$b --json; done

# The chaos soak: 7 hosts, 30 minutes, every fault kind (SEED=... to choose the schedule).
SEED ?= 1
chaos: bootstrap
	$(PY) bench/chaos.py --hosts 7 --duration 1800 --seed $(SEED) --json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
