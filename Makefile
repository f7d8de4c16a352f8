# The few targets a newcomer needs. `make demo` and `make test` are the README's
# two set-up commands: each installs the locked environment first (uv, from the
# package registry), so a fresh machine needs nothing else.
SHELL := /bin/bash
UV := python3 -m uv
RUN := $(UV) run --frozen --no-sync

.PHONY: setup demo test lint typecheck unit format clean

setup:
	@python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen

demo: setup
	$(RUN) fcnpipe demo $(ARGS)

lint:
	$(RUN) ruff check .
	$(RUN) ruff format --check .

typecheck:
	$(RUN) mypy

# Lint, type check, then every test tier (unit, integration, e2e).
test: setup lint typecheck
	$(RUN) pytest $(PYTEST_ARGS)

unit: setup
	$(RUN) pytest -m unit $(PYTEST_ARGS)

format:
	$(RUN) ruff format .
	$(RUN) ruff check --fix .

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache fcnpipe-demo
