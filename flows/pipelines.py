"""The Prefect flows: train, segment, and train-then-segment, on embedded Ray or a cluster.

Usage:
    fcnpipe flow train DATASET_URI --output OUT_URI [--ray-address http://HOST:8265]
    fcnpipe flow segment INPUT_URI --model MODEL_URI --output OUT_URI
    fcnpipe flow train-and-segment DATASET_URI --output OUT_URI
    fcnpipe schedule train DATASET_URI --output OUT_URI --cron "0 3 * * *"
    fcnpipe schedule segment INPUT_URI --model M --output OUT_URI --stream NAME --cron "..."

The flows are thin: each task calls one ``pipeline`` job, either in this process (an
embedded Ray, the default) or, with ``ray_address``, as a Ray Job submitted through the Jobs
API (:mod:`flows.ray_jobs`). Either way the job commits its tables under the output root and
the flow reads what it reports from there (:func:`read_summary`), so both paths report the
same thing. Run ids default to ones derived from the flow run, so a retried task or flow
resumes the same run (training from its checkpoints, segmentation from its written rows)
instead of starting another.
"""

# No `from __future__ import annotations`: Prefect builds its parameter model from the
# annotations of the flows, and a deployment loads this file under another module name,
# where string annotations would not resolve.
import contextlib
import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from logging import getLevelName
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from fcn.metrics import PAPER_METRICS
from flows.progress import ArtifactProgress, artifact_key
from flows.ray_jobs import JobStopped
from pipeline.console import (
    ELSEWHERE_ONLY,
    LOG_LEVEL_ENV,
    NOT_ON_CONSOLE,
    current,
    progress_sink,
)
from pipeline.errors import ConfigError, InputError, user_error
from pipeline.plan import AUTO, Auto
from pipeline.progress import Fanout, PlainLines, ProgressSink, parse_line
from pipeline.results.output import format_score
from pipeline.results.reader import Results, RunSummary
from pipeline.segment.config import SegmentConfig, SegmentData, SegmentScaling
from pipeline.storage import StorageOptions
from pipeline.tables import RunKind
from pipeline.train.config import TrainConfig

__all__ = [
    "TrainAndSegmentResult",
    "ensure_stream_limit",
    "read_summary",
    "segment_flow",
    "stream_limit_name",
    "train_and_segment_flow",
    "train_flow",
]

# Errors a retry cannot fix: the configuration or the input is wrong, or a person stopped
# the job on the cluster. Anything else (a bug, an outage) is retried.
_NOT_RETRIED: tuple[type[BaseException], ...] = (InputError, JobStopped)


def read_summary(output_uri: str, run_id: str, options: StorageOptions | None = None) -> RunSummary:
    """A committed run's summary: its ``runs`` row, read back from the tables.

    Args:
        output_uri: The output root.
        run_id: The run.
        options: Storage options of the output root.

    Raises:
        pipeline.tables.RunNotCommittedError: The run is not committed.
    """
    with Results(output_uri, options) as results:
        return results.summary(run_id)


def flow_run_id(kind: RunKind) -> str:
    """A run id derived from the current flow run: the same for all its retries.

    E.g. ``train-20261121-030000-1a2b3c4d``: the run's scheduled start (UTC) and the start of
    its id. Outside a flow run (tests calling tasks directly), a fresh id.

    Args:
        kind: ``train`` or ``segment``.
    """
    from pipeline.tables import new_run_id

    run = flow_run.get_id()
    if run is None:
        return new_run_id(kind)
    start = flow_run.get_scheduled_start_time()
    return f"{kind}-{start:%Y%m%d-%H%M%S}-{str(run).replace('-', '')[:8]}"


def _retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry infrastructure failures, not bad configuration."""
    error = state.result(raise_on_failure=False)
    # An InputError raised inside a Ray worker arrives wrapped by Ray.
    found = user_error(error) if isinstance(error, BaseException) else None
    return not isinstance(found or error, _NOT_RETRIED)


def _echo() -> Callable[[str], None]:
    """A job's lines: into the run's log (the Prefect UI), and on the console of ``fcnpipe``.

    With an output session (``fcnpipe flow ...``, the demo) the session prints the line and
    the run logger's record stays off the console; without one (a flow called from Python,
    a deployment's run), Prefect's own console handler prints the record.
    """
    log = get_run_logger()
    out = current()
    if out is None:
        return log.info

    def echo(line: str) -> None:
        log.info(line, extra=NOT_ON_CONSOLE)
        out.say(line)

    return echo


def _progress(run_id: str, *, to_log: bool) -> ProgressSink:
    """Where a run's progress goes: the console's display, the Prefect progress artifacts
    and (``to_log``) a plain line every 10 s in the run's Prefect log."""
    sinks: list[ProgressSink] = [progress_sink(), ArtifactProgress(run_id)]
    if to_log:
        log = get_run_logger()
        sinks.append(PlainLines(lambda line: log.info(line, extra=ELSEWHERE_ONLY), step=0.0))
    return Fanout(*sinks)


def _submit(kind: RunKind, config: TrainConfig | SegmentConfig, ray_address: str) -> None:
    from flows.ray_jobs import connect, run_job
    from pipeline.jobs import entrypoint

    client = connect(ray_address)
    # From the run id (itself from the flow run unless given): a retried task, or a new flow
    # run resuming the same run id, attaches to the job that runs it instead of racing it.
    # With overwrite, each flow run redoes the run, so it gets its own job.
    base = f"fcnpipe-{config.run_id}"
    if config.overwrite:
        base += f"-{str(flow_run.get_id() or '').replace('-', '')[:8]}"
    # The job's log carries its progress as plain lines (pipeline.jobs): they become this
    # flow's bars and progress artifacts; its other lines are the job's own, for the user.
    echo, progress = _echo(), _progress(str(config.run_id), to_log=False)
    log = get_run_logger()
    out = current()

    def follow(line: str) -> None:
        update = parse_line(line, key=base)
        if update is None:
            echo(line)
            return
        progress.update(update)
        log.info(line, extra=NOT_ON_CONSOLE if out is not None else {})

    level = getLevelName(out.level) if out is not None else None
    run_job(
        client,
        base,
        entrypoint(kind, config),
        # The job is as quiet (or verbose) as this command.
        runtime_env={"env_vars": {LOG_LEVEL_ENV: level}} if level else None,
        metadata={"fcnpipe_run_id": str(config.run_id), "fcnpipe_kind": kind},
        log=follow,
    )


def _already_committed(config: TrainConfig | SegmentConfig) -> bool:
    """Whether a retry finds its run committed (by an attempt that died after the commit)."""
    from pipeline.store.read import is_committed

    if (
        config.run_id is None
        or config.overwrite
        or not is_committed(config.output_uri, config.run_id, config.data.read.storage)
    ):
        return False
    _echo()(f"run {config.run_id} is already committed under {config.output_uri}; not rerun")
    return True


def _run_job(
    kind: RunKind,
    config: TrainConfig | SegmentConfig,
    ray_address: str | None,
    num_cpus: int | None,
) -> RunSummary:
    """The body of both job tasks: run the job unless committed, then read its summary."""
    assert config.run_id is not None  # set by the flow
    if _already_committed(config):
        pass  # an earlier attempt committed it, then died before reporting
    elif ray_address:
        _submit(kind, config, ray_address)
    elif isinstance(config, TrainConfig):
        from pipeline.train.driver import train

        progress = _progress(config.run_id, to_log=True)
        train(config, echo=_echo(), num_cpus=num_cpus, progress=progress)
    else:
        from pipeline.segment.driver import segment

        progress = _progress(config.run_id, to_log=True)
        segment(config, echo=_echo(), num_cpus=num_cpus, progress=progress)
    return read_summary(config.output_uri, config.run_id, config.data.read.storage)


@task(
    name="train",
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=_retry_unless_user_error,
    persist_result=True,
)
def train_task(
    config: TrainConfig, ray_address: str | None = None, num_cpus: int | None = None
) -> RunSummary:
    """Run the training job (here, or as a Ray Job) and read back its summary."""
    return _run_job("train", config, ray_address, num_cpus)


@task(
    name="segment",
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=_retry_unless_user_error,
    persist_result=True,
)
def segment_task(
    config: SegmentConfig, ray_address: str | None = None, num_cpus: int | None = None
) -> RunSummary:
    """Run the segmentation job (here, or as a Ray Job) and read back its summary."""
    return _run_job("segment", config, ray_address, num_cpus)


def summary_markdown(summary: RunSummary, links: dict[str, str]) -> str:
    """The run's metrics and links as Markdown (the flow's artifact).

    Args:
        summary: The run.
        links: Label -> URI of its outputs.
    """
    lines = [
        f"# {summary.kind} run `{summary.run_id}`",
        "",
        f"{summary.num_images} images, {summary.num_errors} errors.",
        "",
        "| " + " | ".join(PAPER_METRICS.values()) + " |",
        "|" + "---:|" * len(PAPER_METRICS),
        "| " + " | ".join(format_score(summary.scores[k]) for k in PAPER_METRICS) + " |",
        "",
    ]
    lines += [f"- {label}: `{uri}`" for label, uri in links.items()]
    return "\n".join(lines) + "\n"


def _links(summary: RunSummary, output_uri: str) -> dict[str, str]:
    from pipeline.storage import join

    links = {"tables": output_uri}
    if summary.model_uri:
        links["model"] = summary.model_uri
    if summary.input_uri:
        links["input"] = summary.input_uri
    if summary.kind == "segment":
        links["predictions"] = join(output_uri, "predictions", f"run_id={summary.run_id}")
    return links


@task(name="publish", retries=3, retry_delay_seconds=5)
def publish_task(
    summary: RunSummary, output_uri: str, extra_links: dict[str, str] | None = None
) -> None:
    """Prefect artifacts for a run: the paper's metrics with links, and IoU per class."""
    key = artifact_key(summary.run_id)
    links = {**_links(summary, output_uri), **(extra_links or {})}
    create_markdown_artifact(
        summary_markdown(summary, links),
        key=key,
        description=f"fcnpipe {summary.kind} run {summary.run_id}: metrics and outputs",
    )
    if summary.class_iou:
        create_table_artifact(
            [
                {"class_id": i, "class": name, "iou": format_score(iou)}
                for i, (name, iou) in enumerate(
                    zip(summary.class_names, summary.class_iou, strict=True)
                )
            ],
            key=f"{key}-class-iou",
            description=f"IoU per class, run {summary.run_id}",
        )


@task(name="html-report", retries=2, retry_delay_seconds=5)
def report_task(output_uri: str, run_id: str, path: str, options: StorageOptions) -> str:
    """Write the run's self-contained HTML report; returns where it went."""
    from pipeline.results.html import write_html_report

    with Results(output_uri, options) as results:
        return write_html_report(results, run_id, path)


def _with_run_id(config: Any, kind: RunKind) -> Any:
    return config if config.run_id else dataclasses.replace(config, run_id=flow_run_id(kind))


@flow(name="fcnpipe-train", validate_parameters=True)
def train_flow(
    config: TrainConfig, ray_address: str | None = None, num_cpus: int | None = None
) -> RunSummary:
    """Train an FCN and commit its model and tables.

    Args:
        config: The training job (``run_id`` None: derived from this flow run).
        ray_address: A cluster's dashboard (``http://HOST:8265``) to submit a Ray Job to;
            None: an embedded Ray in this process.
        num_cpus: CPUs of the embedded Ray.
    """
    config = _with_run_id(config, "train")
    summary = train_task(config, ray_address, num_cpus)
    publish_task(summary, config.output_uri)
    return summary


@flow(name="fcnpipe-segment", validate_parameters=True)
def segment_flow(
    config: SegmentConfig, ray_address: str | None = None, num_cpus: int | None = None
) -> RunSummary:
    """Segment a dataset or bucket prefix into the result tables.

    Args:
        config: The segmentation job (``run_id`` None: derived from this flow run).
        ray_address: A cluster's dashboard to submit a Ray Job to; None: embedded Ray.
        num_cpus: CPUs of the embedded Ray.
    """
    config = _with_run_id(config, "segment")
    with _one_run_per_stream(config):
        summary = segment_task(config, ray_address, num_cpus)
    publish_task(summary, config.output_uri)
    return summary


def stream_limit_name(config: SegmentConfig) -> str:
    """The Prefect global concurrency limit of a stream: its name and output root (hashed)."""
    root = hashlib.sha256(config.output_uri.rstrip("/").encode()).hexdigest()[:10]
    return f"fcnpipe-stream-{config.stream}-{root}"


def ensure_stream_limit(config: SegmentConfig) -> str:
    """Create the stream's global concurrency limit (one slot) where missing; its name."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    name = stream_limit_name(config)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.upsert_global_concurrency_limit_by_name(name, limit=1)
    return name


@contextlib.contextmanager
def _one_run_per_stream(config: SegmentConfig) -> Iterator[None]:
    """Hold the stream's one slot while segmenting: a second run of the stream waits here
    until the first is done (it then segments only what the first left new). Two runs of a
    stream would otherwise both segment the same new objects."""
    if config.stream is None:
        yield
        return
    from prefect.concurrency.sync import concurrency

    name = ensure_stream_limit(config)
    get_run_logger().info("stream %s: waiting for its slot (%s)", config.stream, name)
    with concurrency(name, occupy=1, strict=True):
        yield


@dataclass(frozen=True)
class TrainAndSegmentResult:
    """The two runs of :func:`train_and_segment_flow`."""

    train: RunSummary
    """The training run."""
    segment: RunSummary
    """The segmentation of the val split with the new model."""
    html_report: str | None
    """Where the HTML report of the segmentation run is (None: not asked for)."""


@flow(name="fcnpipe-train-and-segment", validate_parameters=True)
def train_and_segment_flow(
    config: TrainConfig,
    actors: int | Auto = AUTO,
    batch_size: int = 16,
    segment_run_id: str | None = None,
    html_report: str | None = None,
    ray_address: str | None = None,
    num_cpus: int | None = None,
) -> TrainAndSegmentResult:
    """Train, segment the val split with the new model, then summarise.

    Args:
        config: The training job; its val split is what gets segmented.
        actors: Inference actors of the segmentation (auto: sized from the cluster).
        batch_size: Images per actor call.
        segment_run_id: Run id of the segmentation (None: derived from this flow run).
        html_report: Local path to write the segmentation run's HTML report to.
        ray_address: A cluster's dashboard to submit Ray Jobs to; None: embedded Ray.
        num_cpus: CPUs of the embedded Ray.
    """
    config = _with_run_id(config, "train")
    if config.data.val_split is None:
        raise ConfigError("train_and_segment_flow segments the val split: set data.val_split")
    trained = train_task(config, ray_address, num_cpus)
    publish_task(trained, config.output_uri)
    if trained.model_uri is None:
        raise RuntimeError(f"training run {trained.run_id} committed no model")
    segment_config = SegmentConfig(
        input_uri=config.dataset_uri,
        model_uri=trained.model_uri,
        output_uri=config.output_uri,
        run_id=segment_run_id or flow_run_id("segment"),
        data=SegmentData(split=config.data.val_split, read=config.data.read),
        scaling=SegmentScaling(
            actors=actors,
            batch_size=batch_size,
            use_gpu=config.scaling.use_gpu,
            threads_per_actor=config.scaling.threads_per_worker,
        ),
    )
    segmented = segment_task(segment_config, ray_address, num_cpus)
    report = None
    if html_report:
        report = report_task(
            config.output_uri, segmented.run_id, html_report, config.data.read.storage
        )
    publish_task(segmented, config.output_uri, {"html report": report} if report else None)
    return TrainAndSegmentResult(trained, segmented, report)
