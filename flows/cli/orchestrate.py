"""``fcnpipe flow ...``, ``fcnpipe schedule train | segment`` and ``fcnpipe demo``: the Prefect
side.

The flow commands take the same generated options as ``fcnpipe train`` / ``fcnpipe segment``
(and ``--set FIELD=VALUE``), checked by the same dataclass validation the flows and the Ray
workers apply, plus where the jobs run (``--ray-address``). Prefect is imported only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flows.cli.common import NumCpus, Verbose, app, flow_app, job_output, schedule_app
from flows.cli.jobs import OUTPUT
from flows.cli.options import config_command
from pipeline.errors import ConfigError
from pipeline.plan import AUTO, Auto
from pipeline.segment.config import SegmentConfig
from pipeline.train.config import TrainConfig

if TYPE_CHECKING:
    from pipeline.results.reader import RunSummary

__all__: list[str] = []

RayAddress = Annotated[
    str | None,
    typer.Option(
        help="Submit the jobs to this Ray cluster's Jobs API (http://HOST:8265) instead of an "
        "embedded Ray. RAY_AUTH_TOKEN comes from the environment.",
    ),
]


def _check_ray_address(ray_address: str | None) -> None:
    if ray_address:
        from flows.ray_jobs import connect

        connect(ray_address)  # fail now, in one line, not after Prefect starts


def _print_summary(summary: RunSummary, title: str) -> None:
    from rich.console import Console

    from pipeline.results.output import print_class_iou, print_paper_table

    console = Console()
    print_paper_table(console, {summary.run_id: summary.scores}, title=title, label="run")
    if summary.class_iou:
        print_class_iou(console, list(summary.class_iou), summary.class_names)
    typer.echo(
        f"{summary.kind} run {summary.run_id}: {summary.num_images} images, "
        f"{summary.num_errors} errors; model {summary.model_uri}"
    )


@config_command(flow_app, "train", TrainConfig, arguments=["dataset_uri"], names=OUTPUT)
def flow_train(
    config: TrainConfig,
    *,
    ray_address: RayAddress = None,
    num_cpus: NumCpus = None,
    verbose: Verbose = False,
) -> None:
    """Run the training flow: train, commit the model and tables, publish Prefect artifacts."""
    _check_ray_address(ray_address)
    from flows.pipelines import train_flow

    with job_output(verbose, "flow-train", config.output_uri):
        summary = train_flow(config, ray_address=ray_address, num_cpus=num_cpus)
    _print_summary(summary, "val split of the exported model")


@config_command(
    flow_app,
    "segment",
    SegmentConfig,
    arguments=["input_uri"],
    names={**OUTPUT, "model_uri": ("--model", "-m")},
)
def flow_segment(
    config: SegmentConfig,
    *,
    ray_address: RayAddress = None,
    num_cpus: NumCpus = None,
    verbose: Verbose = False,
) -> None:
    """Run the segmentation flow over a dataset or bucket prefix."""
    _check_ray_address(ray_address)
    from flows.pipelines import segment_flow

    with job_output(verbose, "flow-segment", config.output_uri):
        summary = segment_flow(config, ray_address=ray_address, num_cpus=num_cpus)
    _print_summary(summary, "images with masks")


@config_command(flow_app, "train-and-segment", TrainConfig, arguments=["dataset_uri"], names=OUTPUT)
def flow_train_and_segment(
    config: TrainConfig,
    *,
    actors: Annotated[
        str,
        typer.Option(metavar="INT|auto", help="Inference actors (auto: sized from the cluster)."),
    ] = AUTO,
    html_report: Annotated[
        Path | None, typer.Option(help="Write the segmentation's HTML report here.")
    ] = None,
    ray_address: RayAddress = None,
    num_cpus: NumCpus = None,
    verbose: Verbose = False,
) -> None:
    """Train, segment the val split with the new model, and summarise."""
    _check_ray_address(ray_address)
    from flows.pipelines import train_and_segment_flow

    actors_value: int | Auto = AUTO if actors == AUTO else _positive("--actors", actors)
    with job_output(verbose, "flow-train-and-segment", config.output_uri):
        result = train_and_segment_flow(
            config,
            actors=actors_value,
            html_report=str(html_report) if html_report else None,
            ray_address=ray_address,
            num_cpus=num_cpus,
        )
    _print_summary(result.segment, f"val split segmented by {result.train.run_id}")
    if result.html_report:
        typer.echo(f"report: {result.html_report}")


@config_command(schedule_app, "train", TrainConfig, arguments=["dataset_uri"], names=OUTPUT)
def schedule_train(
    config: TrainConfig,
    *,
    cron: Annotated[str, typer.Option(help='When to train, e.g. "0 3 * * *" (03:00 daily).')],
    timezone: Annotated[str, typer.Option(help="IANA time zone of the cron expression.")] = "UTC",
    name: Annotated[str, typer.Option(help="Deployment name.")] = "scheduled",
    ray_address: RayAddress = None,
    num_cpus: NumCpus = None,
) -> None:
    """Serve the training flow as a deployment on a cron schedule (runs until stopped).

    Each scheduled run trains under its own run id (from its flow run). PREFECT_API_URL
    names the Prefect server; for a work pool instead, see infra/prefect/prefect.yaml.
    """
    from flows.schedule import check_schedule, check_server, serve_train

    schedule = check_schedule(cron, timezone)
    if config.run_id is not None:
        raise ConfigError("--run-id: a scheduled run derives its run id from its flow run")
    check_server()
    _check_ray_address(ray_address)
    serve_train(config, schedule, name=name, ray_address=ray_address, num_cpus=num_cpus)


@config_command(
    schedule_app,
    "segment",
    SegmentConfig,
    arguments=["input_uri"],
    names={**OUTPUT, "model_uri": ("--model", "-m")},
)
def schedule_segment(
    config: SegmentConfig,
    *,
    cron: Annotated[str, typer.Option(help='When to segment, e.g. "*/15 * * * *".')],
    timezone: Annotated[str, typer.Option(help="IANA time zone of the cron expression.")] = "UTC",
    name: Annotated[str, typer.Option(help="Deployment name.")] = "scheduled",
    ray_address: RayAddress = None,
    num_cpus: NumCpus = None,
) -> None:
    """Serve the incremental segmentation of a bucket (--stream NAME) on a cron schedule.

    Each run segments only the objects new or rewritten since the stream's committed runs.
    At most one run of a stream is active: a run triggered while another is active waits for
    it (a Prefect global concurrency limit of one slot per stream and output root).
    """
    from flows.schedule import check_schedule, check_server, serve_segment

    schedule = check_schedule(cron, timezone)
    if config.stream is None:
        raise ConfigError("--stream NAME is required: a scheduled segmentation is incremental")
    if config.run_id is not None:
        raise ConfigError("--run-id: a scheduled run derives its run id from its flow run")
    check_server()
    _check_ray_address(ray_address)
    serve_segment(config, schedule, name=name, ray_address=ray_address, num_cpus=num_cpus)


@app.command()
def demo(
    workdir: Annotated[
        Path, typer.Option(help="Where the demo's bucket, outputs and report go.")
    ] = Path("fcnpipe-demo"),
    num_images: Annotated[int, typer.Option(min=8, help="Synthetic images to make.")] = 400,
    size: Annotated[int, typer.Option(min=32, help="Image side in pixels.")] = 128,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 20,
    num_cpus: NumCpus = None,
    seed: Annotated[int, typer.Option(help="Seed for data, weights and order.")] = 0,
    verbose: Verbose = False,
) -> None:
    """Synthetic data -> train_and_segment_flow (DDP on embedded Ray) -> report."""
    from flows.demo import DemoConfig, run_demo

    config = DemoConfig(
        workdir=workdir,
        num_images=num_images,
        size=size,
        epochs=epochs,
        num_cpus=num_cpus,
        seed=seed,
    )
    with job_output(verbose, "demo", workdir):
        run_demo(config)


def _positive(option: str, value: str) -> int:
    """``value`` as an integer >= 1, or a one-line error naming ``option``."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError(f"{option} must be an integer >= 1 or auto, got {value!r}")
    return number
