"""The installed ``fcnpipe`` entry point: pipeline commands plus the Prefect ones.

Usage:
    fcnpipe demo [--workdir DIR]
    fcnpipe flow train DATASET_URI --output OUT_URI [--set epochs=4 ...] [--ray-address URL]
    fcnpipe flow segment INPUT_URI --model MODEL_URI --output OUT_URI
    fcnpipe flow train-and-segment DATASET_URI --output OUT_URI [--html-report PATH]
    fcnpipe schedule train DATASET_URI --output OUT_URI --cron "0 3 * * *" [--timezone TZ]

``pipeline.cli`` holds the commands that run without Prefect; this module adds the ones
that orchestrate them, so that ``pipeline`` never imports Prefect. The flow commands take
the job's configuration fields as ``--set FIELD=VALUE`` (JSON values; ``dataset.layout=voc``
for nested fields), checked by the same dataclass validation the flows and the Ray workers
apply, instead of repeating every option of ``fcnpipe train``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pipeline.cli import USER_ERRORS, S3Endpoint, app, run

if TYPE_CHECKING:
    from flows.pipelines import RunSummary

__all__ = ["app", "main"]

flow_app = typer.Typer(help="Run the Prefect flows once, now.", no_args_is_help=True)
schedule_app = typer.Typer(
    help="Serve flows as scheduled Prefect deployments.", no_args_is_help=True
)
app.add_typer(flow_app, name="flow")
app.add_typer(schedule_app, name="schedule")

Sets = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="A configuration field, FIELD=VALUE (VALUE as JSON, else a string); repeatable. "
        "Fields: those of `fcnpipe train` / `fcnpipe segment` with underscores.",
    ),
]
RayAddress = Annotated[
    str | None,
    typer.Option(
        help="Submit the jobs to this Ray cluster's Jobs API (http://HOST:8265) instead of an "
        "embedded Ray. RAY_AUTH_TOKEN comes from the environment.",
    ),
]
NumCpus = Annotated[int | None, typer.Option(help="CPUs of the embedded Ray (default: all).")]


def _parse_sets(sets: list[str] | None) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for item in sets or ():
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set epochs=4")
        try:
            value: Any = json.loads(text)
        except json.JSONDecodeError:
            value = text
        *parents, leaf = key.strip().split(".")
        target = fields
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ValueError(f"--set {item!r}: {parent} is not a nested configuration")
        target[leaf] = value
    return fields


def _config(kind: str, fields: dict[str, Any], sets: list[str] | None, s3: str | None) -> Any:
    """A ``TrainConfig`` or ``SegmentConfig`` from fixed fields and ``--set`` ones."""
    from pydantic import ValidationError

    from pipeline.jobs import config_from_json

    merged = {**fields, **_parse_sets(sets)}
    if s3:
        storage = merged.setdefault("dataset", {}).setdefault("storage", {})
        storage["s3_endpoint"] = s3
    try:
        return config_from_json("train" if kind == "train" else "segment", json.dumps(merged))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'config'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ValueError(f"invalid {kind} configuration: {problems}") from None


def _check_ray_address(ray_address: str | None) -> None:
    if ray_address:
        from flows.ray_jobs import connect

        connect(ray_address)  # fail now, in one line, not after Prefect starts


def _print_summary(summary: RunSummary, title: str) -> None:
    from rich.console import Console

    from pipeline.summary import print_class_iou, print_paper_table

    console = Console()
    print_paper_table(console, {summary.run_id: summary.scores}, title=title, label="run")
    if summary.class_iou:
        print_class_iou(console, list(summary.class_iou), summary.class_names)
    typer.echo(
        f"{summary.kind} run {summary.run_id}: {summary.num_images} images, "
        f"{summary.num_errors} errors; model {summary.model_uri}"
    )


@flow_app.command("train")
def flow_train(
    dataset_uri: Annotated[str, typer.Argument(help="Dataset root or manifest, with masks.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output root.")],
    sets: Sets = None,
    ray_address: RayAddress = None,
    num_cpus: NumCpus = None,
    s3_endpoint: S3Endpoint = None,
) -> None:
    """Run the training flow: train, commit the model and tables, publish Prefect artifacts."""
    config = _config("train", {"dataset_uri": dataset_uri, "output_uri": output}, sets, s3_endpoint)
    _check_ray_address(ray_address)
    from flows.pipelines import train_flow

    summary = train_flow(config, ray_address=ray_address, num_cpus=num_cpus)
    _print_summary(summary, "val split of the exported model")


@flow_app.command("segment")
def flow_segment(
    input_uri: Annotated[str, typer.Argument(help="Dataset root, manifest, or image prefix.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model artifact URI.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output root.")],
    sets: Sets = None,
    ray_address: RayAddress = None,
    num_cpus: NumCpus = None,
    s3_endpoint: S3Endpoint = None,
) -> None:
    """Run the segmentation flow over a dataset or bucket prefix."""
    fields = {"input_uri": input_uri, "model_uri": model, "output_uri": output}
    config = _config("segment", fields, sets, s3_endpoint)
    _check_ray_address(ray_address)
    from flows.pipelines import segment_flow

    summary = segment_flow(config, ray_address=ray_address, num_cpus=num_cpus)
    _print_summary(summary, "images with masks")


@flow_app.command("train-and-segment")
def flow_train_and_segment(
    dataset_uri: Annotated[str, typer.Argument(help="Dataset root or manifest, with masks.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output root.")],
    sets: Sets = None,
    actors: Annotated[int, typer.Option(min=1, help="Inference actors.")] = 1,
    html_report: Annotated[
        Path | None, typer.Option(help="Write the segmentation's HTML report here.")
    ] = None,
    ray_address: RayAddress = None,
    num_cpus: NumCpus = None,
    s3_endpoint: S3Endpoint = None,
) -> None:
    """Train, segment the val split with the new model, and summarise."""
    config = _config("train", {"dataset_uri": dataset_uri, "output_uri": output}, sets, s3_endpoint)
    _check_ray_address(ray_address)
    from flows.pipelines import train_and_segment_flow

    result = train_and_segment_flow(
        config,
        actors=actors,
        html_report=str(html_report) if html_report else None,
        ray_address=ray_address,
        num_cpus=num_cpus,
    )
    _print_summary(result.segment, f"val split segmented by {result.train.run_id}")
    if result.html_report:
        typer.echo(f"report: {result.html_report}")


@schedule_app.command("train")
def schedule_train(
    dataset_uri: Annotated[str, typer.Argument(help="Dataset root or manifest, with masks.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output root.")],
    cron: Annotated[str, typer.Option(help='When to train, e.g. "0 3 * * *" (03:00 daily).')],
    timezone: Annotated[str, typer.Option(help="IANA time zone of the cron expression.")] = "UTC",
    name: Annotated[str, typer.Option(help="Deployment name.")] = "scheduled",
    sets: Sets = None,
    ray_address: RayAddress = None,
    num_cpus: NumCpus = None,
    s3_endpoint: S3Endpoint = None,
) -> None:
    """Serve the training flow as a deployment on a cron schedule (runs until stopped).

    Each scheduled run trains under its own run id (from its flow run). PREFECT_API_URL
    names the Prefect server; for a work pool instead, see infra/prefect/prefect.yaml.
    """
    from flows.schedule import check_schedule, check_server, serve_train

    config = _config("train", {"dataset_uri": dataset_uri, "output_uri": output}, sets, s3_endpoint)
    schedule = check_schedule(cron, timezone)
    if config.run_id is not None:
        raise ValueError("--set run_id: a scheduled run derives its run id from its flow run")
    check_server()
    _check_ray_address(ray_address)
    serve_train(config, schedule, name=name, ray_address=ray_address, num_cpus=num_cpus)


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
) -> None:
    """Synthetic data -> train_and_segment_flow (2 DDP workers on embedded Ray) -> report."""
    from flows.demo import DemoConfig, run_demo

    run_demo(
        DemoConfig(
            workdir=workdir,
            num_images=num_images,
            size=size,
            epochs=epochs,
            num_cpus=num_cpus,
            seed=seed,
        )
    )


def main() -> None:
    """Console-script entry point."""
    from flows.ray_jobs import JobFailed, RayAddressError

    # Before Prefect is imported (it reads its settings once): an ephemeral server would
    # try to send usage telemetry, and log an error for each try where there is no network.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect gives its ephemeral server 20 s to start; a busy 2-core machine (a fresh
    # install's first start, Ray starting beside it) can need more, and the flow then fails
    # before it begins.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

    run(app, (*USER_ERRORS, RayAddressError, JobFailed))


if __name__ == "__main__":
    main()
