"""What every ``fcnpipe`` command shares: the Typer apps, common options, and how errors print.

Errors: bad input (:class:`pipeline.errors.InputError`) prints one line naming the object and
the reason, exit code 2; an unavailable service (:class:`pipeline.errors.ServiceError`: the
S3 server down after retries, a Ray job that failed on the cluster) one line, exit code 1;
anything else is a bug and keeps its traceback (exit code 1). ``FCNPIPE_DEBUG=1`` shows the
traceback of the one-line errors too.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.errors import InputError, ServiceError
from pipeline.storage import StorageOptions

__all__ = [
    "CatalogOption",
    "LayoutOption",
    "NumCpus",
    "S3Endpoint",
    "app",
    "bench_app",
    "dataset_app",
    "experiment_app",
    "flow_app",
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
    except (InputError, ServiceError) as exc:
        if os.environ.get("FCNPIPE_DEBUG"):
            raise
        # Escaped: paths and keys may hold [brackets] that Rich would read as markup.
        message = " ".join(str(exc).split())
        Console(stderr=True).print(
            f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True
        )
        sys.exit(2 if isinstance(exc, InputError) else 1)
