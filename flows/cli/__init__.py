"""The ``fcnpipe`` command line (the installed entry point).

Usage:
    fcnpipe --help

Commands by what they touch: ``data`` (models, dataset synth | index | info), ``jobs``
(train, segment), ``results`` (query, runs, report, show), ``bench`` (bench read | train |
segment | tables, experiment skips), ``tables`` (tables info | maintain | migrate) and
``orchestrate`` (flow ..., schedule train, demo). Each builds the same typed configuration
the Python API, the Prefect flows and the Ray workers take (``pipeline.config``); only the
orchestrating commands import Prefect. Errors: ``flows.cli.common.run``.
"""

from __future__ import annotations

import os

from flows.cli import bench, data, jobs, orchestrate, results, tables  # noqa: F401  (they register)
from flows.cli.common import app, run

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    # Before Prefect is imported (it reads its settings once): an ephemeral server would
    # try to send usage telemetry, and log an error for each try where there is no network.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect gives its ephemeral server 20 s to start; a busy 2-core machine (a fresh
    # install's first start, Ray starting beside it) can need more, and the flow then fails
    # before it begins.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    run(app)


if __name__ == "__main__":
    main()
