# The few targets a newcomer needs. `make demo` and `make test` are the README's
# two set-up commands: each installs the locked environment first (uv, from the
# package registry), so a fresh machine needs nothing else.
SHELL := /bin/bash
UV := python3 -m uv
# Tools run straight from the venv, not through `uv run`: Ray detects a driver started by
# `uv run` and makes every worker re-run `uv run` in a copy of the working directory,
# where no environment exists, so no worker starts.
RUN := .venv/bin/

.PHONY: setup demo test lint typecheck unit format clean

setup:
	@python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv \
		|| python3 -m pip install --quiet --user --break-system-packages uv
	# Compiled at install: with PYTHONDONTWRITEBYTECODE set (as on our machines) Python
	# never caches .pyc files, and every Ray worker would compile torch again (import
	# time 11 s instead of 5 s here).
	$(UV) sync --frozen --compile-bytecode

demo: setup
	$(RUN)fcnpipe demo $(ARGS)

lint:
	$(RUN)ruff check .
	$(RUN)ruff format --check .

typecheck:
	$(RUN)mypy

# Lint, type check, then every test tier (unit, integration, e2e).
test: setup lint typecheck
	$(RUN)pytest $(PYTEST_ARGS)

unit: setup
	$(RUN)pytest -m unit $(PYTEST_ARGS)

format:
	$(RUN)ruff format .
	$(RUN)ruff check --fix .

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache fcnpipe-demo
