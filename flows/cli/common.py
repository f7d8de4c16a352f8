"""What every ``fcnpipe`` command shares: the Typer apps, common options, what a person sees
while a job runs, and how errors print.

Output: a command that runs jobs opens an output session (:func:`job_output`,
:mod:`pipeline.console`): the job's lines and its progress on the console, Ray's and
Prefect's messages in a log file whose path it prints first; ``--verbose`` (or
``FCNPIPE_LOG_LEVEL=INFO``) shows those too.

Errors: bad input (:class:`pipeline.errors.InputError`) prints one line naming the object and
the reason, exit code 2; an unavailable service (:class:`pipeline.errors.ServiceError`: the
S3 server down after retries, a Ray job that failed on the cluster) one line, exit code 1,
also when raised inside a Ray worker (:func:`pipeline.errors.user_error` finds it behind
Ray's wrapping); anything else is a bug and keeps its traceback (exit code 1).
``FCNPIPE_DEBUG=1`` shows the traceback of the one-line errors too.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.errors import InputError, user_error
from pipeline.storage import StorageOptions

if TYPE_CHECKING:
    from pipeline.console import Output

__all__ = [
    "CatalogOption",
    "LayoutOption",
    "NumCpus",
    "S3Endpoint",
    "Verbose",
    "app",
    "bench_app",
    "dataset_app",
    "experiment_app",
    "flow_app",
    "job_output",
    "run",
    "schedule_app",
    "storage_options",
    "tables_app",
]

app = typer.Typer(
    name="fcnpipe",
    help="Distributed batch semantic segmentation with Fully Convolutional Networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dataset_app = typer.Typer(help="Make, index and inspect datasets.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print figures.", no_args_is_help=True)
experiment_app = typer.Typer(help="Experiments of the paper, reproduced.", no_args_is_help=True)
flow_app = typer.Typer(help="Run the Prefect flows once, now.", no_args_is_help=True)
schedule_app = typer.Typer(
    help="Serve flows as scheduled Prefect deployments.", no_args_is_help=True
)
app.add_typer(dataset_app, name="dataset")
app.add_typer(bench_app, name="bench")
app.add_typer(experiment_app, name="experiment")
app.add_typer(flow_app, name="flow")
app.add_typer(schedule_app, name="schedule")
tables_app = typer.Typer(
    help="The result tables' Iceberg catalog: connect, maintain, migrate.", no_args_is_help=True
)
app.add_typer(tables_app, name="tables")

S3Endpoint = Annotated[
    str | None,
    typer.Option(
        "--s3-endpoint",
        help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL). "
        "Credentials come from the standard AWS variables or profile, never from options.",
    ),
]
CatalogOption = Annotated[
    str | None,
    typer.Option(
        "--catalog",
        help="Iceberg catalog of the result tables: https://... (REST), thrift://... (Hive), "
        "glue://, sqlite:///... (default: FCNPIPE_CATALOG, else the embedded SQLite catalog). "
        "Credentials come from the environment (PYICEBERG_CATALOG__FCNPIPE__*), never options.",
    ),
]
LayoutOption = Annotated[
    Literal["auto", "voc", "generic", "images"],
    typer.Option(help="Dataset layout; auto detects it."),
]
NumCpus = Annotated[
    int | None, typer.Option(help="CPUs of the embedded Ray (default: all; not on a cluster).")
]
Verbose = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="Also show Ray's and Prefect's messages and the Ray workers' output (the log file "
        "always has them); FCNPIPE_LOG_LEVEL=INFO does the same.",
    ),
]


@contextlib.contextmanager
def job_output(verbose: bool, name: str, root: str | Path | None = None) -> Iterator[Output]:
    """An output session for a command that runs jobs; prints where its log file is.

    The log file is ``ROOT/_logs/NAME-<time>.log`` for a local ``root`` (the output root, the
    demo's directory), else under ``FCNPIPE_LOG_DIR`` or the temporary directory. A command
    that runs Prefect flows imports them first: Prefect sets its logging up on import, and
    the session takes over from it.

    Args:
        verbose: ``--verbose``.
        name: The command, e.g. ``train``.
        root: Where the log goes (see above).
    """
    from pipeline.console import level_from, log_path, session

    level = level_from(verbose)
    path = log_path(name, root)
    try:
        with session(path, level=level) as out:
            out.echo(f"log: {path}")
            yield out
    finally:
        if level > logging.INFO and "prefect" in sys.modules:
            # Prefect stops its temporary server at exit, after the session, and says so at
            # INFO; this hook runs before that one (atexit runs the latest first).
            atexit.register(logging.getLogger("prefect").setLevel, logging.WARNING)


def storage_options(s3_endpoint: str | None, catalog: str | None = None) -> StorageOptions:
    """Storage options from ``--s3-endpoint`` and ``--catalog`` (and the environment)."""
    return StorageOptions(s3_endpoint=s3_endpoint, catalog=catalog)


def run(typer_app: typer.Typer) -> None:
    """Run a Typer app, printing bad input and unavailable services as one line.

    Args:
        typer_app: The application to run.
    """
    # Ray makes every worker re-run `uv run` in a copy of the working directory when the
    # driver was started by `uv run`; our workers use this interpreter's environment.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    try:
        typer_app()
    except Exception as exc:
        error = user_error(exc)
        if error is None or os.environ.get("FCNPIPE_DEBUG"):
            raise
        # Escaped: paths and keys may hold [brackets] that Rich would read as markup.
        message = " ".join(str(error).split())
        Console(stderr=True).print(
            f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True
        )
        sys.exit(2 if isinstance(error, InputError) else 1)
