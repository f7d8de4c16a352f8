"""Scheduled training and incremental segmentation: flows served as Prefect deployments with a
cron schedule.

Usage:
    fcnpipe schedule train s3://data/voc --output s3://results --cron "0 3 * * *" \\
        --timezone Europe/Paris --set epochs=30
    fcnpipe schedule segment s3://cameras/front --model s3://results/models/RUN \\
        --output s3://results --stream front --cron "*/15 * * * *"

A scheduled segmentation is a stream (``--stream``): each run segments only what is new or
rewritten since the stream's committed runs. At most one run of a stream is active at a time:
:func:`flows.pipelines.segment_flow` holds the stream's Prefect global concurrency limit (one
slot, :func:`flows.pipelines.stream_limit_name`) while it segments, so a run triggered while
another is active *waits* for it (state Running, in the flow's log), then segments what is
still new.

``flow.serve`` registers the deployment with the Prefect server (``PREFECT_API_URL``) and runs
its scheduled (and manually triggered) flow runs in subprocesses of this one until stopped.
For a process work pool and ``prefect deploy``, see ``infra/prefect/prefect.yaml``.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import ConfigError
from pipeline.segment.config import SegmentConfig
from pipeline.train.config import TrainConfig

__all__ = [
    "DEPLOYMENT_FLOW",
    "check_schedule",
    "check_server",
    "serve_segment",
    "serve_train",
    "train_parameters",
]

DEPLOYMENT_FLOW = "fcnpipe-train"
"""The flow name deployments of :func:`flows.pipelines.train_flow` are listed under."""

SEGMENT_FLOW = "fcnpipe-segment"
"""The flow name deployments of :func:`flows.pipelines.segment_flow` are listed under."""


def check_schedule(cron: str, timezone: str = "UTC") -> Any:
    """A Prefect cron schedule, after checking the expression and the time zone.

    Args:
        cron: Five-field cron expression, e.g. ``0 3 * * *``, or a macro such as ``@daily``.
        timezone: IANA time zone the expression is read in.

    Raises:
        ConfigError: Not a cron expression, or not a time zone (the message names it).
    """
    from prefect._internal.schemas.validators import validate_cron_string
    from prefect.client.schemas.schedules import is_valid_timezone
    from prefect.schedules import Cron

    try:
        validate_cron_string(cron)
    except ValueError:
        raise ConfigError(
            f"--cron {cron!r} is not a cron expression: use five fields, minute hour "
            "day-of-month month day-of-week, e.g. '0 3 * * *' for 03:00 every day"
        ) from None
    if len(cron.split()) != 5 and not cron.startswith("@"):  # @daily and friends are fine
        raise ConfigError(f"--cron {cron!r}: use exactly five fields, e.g. '0 3 * * *'")
    if not is_valid_timezone(timezone):
        raise ConfigError(f"--timezone {timezone!r} is not an IANA time zone, e.g. Europe/Paris")
    return Cron(cron, timezone=timezone)


def check_server() -> str:
    """The Prefect server's API URL, checked to answer: schedules need a real server.

    Prefect's ephemeral server (what runs when ``PREFECT_API_URL`` is unset) has no
    scheduler, so a deployment served on it would never run on its schedule.

    Raises:
        ConfigError: ``PREFECT_API_URL`` is unset, or the server does not answer.
    """
    import urllib.request

    from prefect.settings import PREFECT_API_URL

    url = (PREFECT_API_URL.value() or "").rstrip("/")
    if not url:
        raise ConfigError(
            "schedules need a Prefect server: set PREFECT_API_URL, e.g. "
            "http://127.0.0.1:4200/api (`python -m infra.local.prefect_server --home DIR` "
            "starts one); the ephemeral server has no scheduler"
        )
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10):
            pass
    except OSError as exc:
        raise ConfigError(f"Prefect server {url} does not answer ({exc})") from None
    return url


def train_parameters(
    config: TrainConfig | SegmentConfig,
    *,
    ray_address: str | None = None,
    num_cpus: int | None = None,
) -> dict[str, Any]:
    """The deployment's parameters: the training (or segmentation) flow's, as JSON values.

    Args:
        config: The job every scheduled run does.
        ray_address: The cluster's dashboard, or None for embedded Ray.
        num_cpus: CPUs of the embedded Ray.
    """
    from pipeline.config import dump

    return {
        "config": dump(config),
        "ray_address": ray_address,
        "num_cpus": num_cpus,
    }


def serve_train(
    config: TrainConfig,
    schedule: Any,
    *,
    name: str = "scheduled",
    ray_address: str | None = None,
    num_cpus: int | None = None,
) -> None:
    """Create (or update) the deployment and serve it until interrupted.

    Args:
        config: The training job of every run (its ``run_id`` must be None).
        schedule: From :func:`check_schedule`.
        name: Deployment name: ``fcnpipe-train/<name>``.
        ray_address: The cluster's dashboard, or None for embedded Ray.
        num_cpus: CPUs of the embedded Ray.
    """
    from flows.pipelines import train_flow

    train_flow.serve(
        name=name,
        schedule=schedule,
        parameters=train_parameters(config, ray_address=ray_address, num_cpus=num_cpus),
        description=f"Train {config.model.name} on {config.dataset_uri} into {config.output_uri}",
        tags=["fcnpipe", "train"],
    )


def serve_segment(
    config: SegmentConfig,
    schedule: Any,
    *,
    name: str = "scheduled",
    ray_address: str | None = None,
    num_cpus: int | None = None,
) -> None:
    """Create (or update) the incremental segmentation's deployment and serve it until
    interrupted.

    Args:
        config: The segmentation of every run (a ``stream``, no ``run_id``).
        schedule: From :func:`check_schedule`.
        name: Deployment name: ``fcnpipe-segment/<name>``.
        ray_address: The cluster's dashboard, or None for embedded Ray.
        num_cpus: CPUs of the embedded Ray.

    Raises:
        ConfigError: No stream, or a run id.
    """
    from flows.pipelines import ensure_stream_limit, segment_flow

    if config.stream is None:
        raise ConfigError(
            "--stream NAME: a scheduled segmentation is incremental (each run segments what is "
            "new since the stream's last runs)"
        )
    if config.run_id is not None:
        raise ConfigError("--run-id: a scheduled run derives its run id from its flow run")
    ensure_stream_limit(config)  # visible in the UI before the first run
    segment_flow.serve(
        name=name,
        schedule=schedule,
        parameters=train_parameters(config, ray_address=ray_address, num_cpus=num_cpus),
        description=(
            f"Segment what is new under {config.input_uri} with {config.model_uri} into "
            f"{config.output_uri} (stream {config.stream})"
        ),
        tags=["fcnpipe", "segment", f"stream:{config.stream}"],
    )
