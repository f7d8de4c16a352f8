"""Batch segmentation over a bucket: Ray Data actors writing label maps and metrics tables.

Usage:
    fcnpipe segment INPUT_URI --model MODEL_URI --output OUT_URI [--run-id ID --split val \\
        --batch-size 8 --actors 2 --use-gpu]

The driver (:func:`segment`) loads the model card (failing early on a bad model URI),
lists the input (a dataset root in any layout, a manifest, or any prefix of images),
leaves out the images a crashed attempt of the same run already wrote, and streams the
rest through Ray Data: read + bounded decode in tasks (:func:`pipeline.data.reading.read_decoded`),
then ``map_batches`` over a pool of :class:`Segmenter` actors. Each actor loads the model
artifact once (``weights_only``), runs under ``torch.inference_mode()``, keeps every image at
its own size (equal sizes are batched together) and returns one row per input row: a
prediction, or an error. The driver writes the rows to the ``predictions``,
``class_metrics`` and ``errors`` tables as they arrive (files of ``rows_per_file`` rows),
then the ``runs`` row, and commits the run: nothing is visible before the marker.

Every input object ends in exactly one of ``predictions`` or ``errors``. Rerunning a
crashed run with the same ``--run-id`` skips the images already written and never
duplicates a row; ``--overwrite`` replaces a committed run.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fcn.metrics import nan_to_none, scores_from_counts
from pipeline import storage
from pipeline.artifacts import ModelCard, load_card
from pipeline.console import progress_sink
from pipeline.data.layouts import DatasetError, load_manifest, manifest_meta
from pipeline.faults import Faults
from pipeline.plan import SegmentPlan, detect_resources, model_footprint, plan_segment
from pipeline.progress import ProgressSink, Tracker
from pipeline.segment.actor import COUNTS, ActorPlan, Segmenter
from pipeline.segment.config import SegmentConfig
from pipeline.segment.engines import Backend
from pipeline.storage import StorageOptions
from pipeline.tables import RunWriter, check_not_committed, new_run_id, runs_row

__all__ = ["SegmentResult", "segment"]

_NO_LIMIT = 2**62


_MAX_FILE_BYTES = 64 * 2**20  # of predictions (label maps) buffered before a flush


@dataclass(frozen=True)
class SegmentResult:
    """What a segmentation run produced."""

    run_id: str
    """Under which id the run committed (given, or made up)."""
    num_images: int
    """Images with a prediction (all attempts)."""
    num_errors: int
    """Objects that became error rows (all attempts)."""
    scores: dict[str, Any] | None
    """Paper metrics over the images with masks; None without masks."""
    class_names: list[str]
    """Class names of the model."""
    images_per_s: float
    """Images (good or not) this attempt processed per second of wall time."""
    skipped: int
    """Images skipped because an earlier attempt had written them."""
    seconds: float
    """Wall time of the call."""
    steady_images_per_s: float | None = None
    """Images/s from the first result to the last: the rate once the actors are up."""
    precision: str | None = None
    """What the model ran in (``pipeline.compute``); None when nothing was left to do."""
    engine: str | None = None
    """The engine that ran it (``pipeline.segment.engines``), e.g. ``torch 2.14.1``."""


def segment(
    config: SegmentConfig,
    *,
    echo: Callable[[str], None] = print,
    num_cpus: int | None = None,
    faults: Faults | None = None,
    progress: ProgressSink | None = None,
) -> SegmentResult:
    """Segment every image of the input into the run's committed tables.

    Args:
        config: The job.
        echo: Where the summary line goes.
        num_cpus: CPUs of the embedded Ray, if this call starts one.
        faults: Testing only: where actors stall or the driver exits (``pipeline.faults``).
        progress: Where the ``segmenting`` progress goes (default: the console's,
            ``pipeline.console.progress_sink``).

    Raises:
        pipeline.artifacts.ArtifactError: The model artifact is missing or broken.
        pipeline.data.layouts.DatasetError: Nothing to read at the input.
        pipeline.tables.RunExistsError: The run is committed and ``overwrite`` is off.
    """
    started = datetime.now(UTC)
    clock = time.perf_counter()
    job = _preflight(config, config.run_id or new_run_id("segment"), echo)
    done = job.writer.existing_ids("predictions") | (job.writer.existing_ids("errors") - {None})
    todo = job.manifest.filter(
        pc.invert(pc.is_in(job.manifest["image_id"], pa.array(sorted(done), pa.string())))
    )
    skipped = job.manifest.num_rows - todo.num_rows
    echo(
        f"run {job.run_id}: {todo.num_rows} image(s) to segment"
        + (f", {skipped} already written by an earlier attempt" if done else "")
    )
    stream, plan = _Stream(), None
    if todo.num_rows:
        from pipeline.cluster import ensure_ray

        ensure_ray(num_cpus=num_cpus)
        plan = _plan(config, job, todo.num_rows)
        echo(plan.describe())
        tracker = Tracker(
            "segmenting",
            todo.num_rows,
            progress or progress_sink(),
            unit="images",
            rate_unit="img/s",
            key=f"{job.run_id}/segment",
        )
        tracker.set(0, errors=0)
        stream = _stream(config, job, todo, plan, faults, tracker)
        tracker.finish()
    processed = stream.processed
    seconds = time.perf_counter() - clock
    totals, num_images, num_errors = _run_totals(job.writer, job.card.num_classes)
    scores = None
    if totals is not None:
        counts = (totals["gt_pixels"], totals["intersection"], totals["union"])
        scores = nan_to_none(scores_from_counts(*counts))
    images_per_s = processed / seconds if seconds > 0 else 0.0
    finished = datetime.now(UTC)
    job.writer.write(
        "runs",
        [
            runs_row(
                kind="segment",
                input_uri=config.input_uri,
                model_uri=config.model_uri,
                num_images=num_images,
                num_errors=num_errors,
                scores=scores,
                class_names=job.card.class_names,
                started_at=started,
                finished_at=finished,
                images_per_s=images_per_s,
                precision=stream.precision,
                channels_last=stream.channels_last,
                engine=stream.engine,
                plan=None if plan is None else plan.describe(),
            )
        ],
    )
    extra: dict[str, Any] = {"model_uri": config.model_uri}
    if totals is not None:
        extra["class_totals"] = {name: totals[name].tolist() for name in COUNTS}
    job.writer.commit(extra, finished_at=finished)
    summary = (
        f"run {job.run_id}: {num_images} images, {num_errors} errors, {images_per_s:.1f} images/s"
    )
    if scores is not None and scores["mean_iou"] is not None:
        summary += f", mean IoU {scores['mean_iou']:.3f}"
    if stream.engine is not None:
        layout = " + channels_last" if stream.channels_last else ""
        summary += f"; {stream.engine} {stream.precision}{layout}"
    echo(summary)
    return SegmentResult(
        run_id=job.run_id,
        num_images=num_images,
        num_errors=num_errors,
        scores=scores,
        class_names=list(job.card.class_names),
        images_per_s=images_per_s,
        skipped=skipped,
        seconds=time.perf_counter() - clock,
        steady_images_per_s=stream.steady,
        precision=stream.precision,
        engine=stream.engine,
    )


@dataclass(frozen=True, kw_only=True)
class _Job:
    """What the preflight established, before Ray starts: the model, the input, the run."""

    run_id: str
    options: StorageOptions
    card: ModelCard
    manifest: pa.Table
    writer: RunWriter
    backend: Backend


def _preflight(config: SegmentConfig, run_id: str, echo: Callable[[str], None]) -> _Job:
    """Check the model, the input and the run before Ray starts; open the run's writer."""
    options = config.data.read.storage.with_environment()
    out = storage.resolve(config.output_uri, options)
    card = load_card(config.model_uri, options)
    if config.output.write_png is not None:
        storage.resolve(config.output.write_png, options)  # a bad URI fails now, not in an actor
    check_not_committed(out, run_id, config.overwrite)
    if not storage.exists(config.input_uri, options):
        raise DatasetError(f"nothing at {config.input_uri}")
    manifest = load_manifest(
        config.input_uri, config.data.split, layout=config.data.read.layout, options=options
    )
    if pc.count_distinct(manifest["image_id"]).as_py() != manifest.num_rows:
        raise DatasetError(
            f"{config.input_uri}: image ids repeat; each image needs its own id (rows are keyed"
            " by it)"
        )
    meta = manifest_meta(manifest)
    if meta.class_names is not None and len(meta.class_names) != card.num_classes:
        raise DatasetError(
            f"{config.input_uri} has {len(meta.class_names)} classes, the model "
            f"{config.model_uri} {card.num_classes}: masks would be scored against other classes"
        )
    backend = _onnx_ready(config, card, options, echo)
    # The driver decides when files are written (see _Tables), not a per-table size limit.
    writer = RunWriter(
        out, run_id, "segment", overwrite=config.overwrite, max_rows=_NO_LIMIT, max_bytes=_NO_LIMIT
    )
    return _Job(
        run_id=run_id,
        options=options,
        card=card,
        manifest=manifest,
        writer=writer,
        backend=backend,
    )


def _onnx_ready(
    config: SegmentConfig, card: ModelCard, options: StorageOptions, echo: Callable[[str], None]
) -> Backend:
    """The backend the actors get, with the artifact's ONNX export made where an engine needs
    it (once, into the artifact; a few seconds). ``auto`` without a way to write the export
    falls back to torch, saying so; an ONNX engine asked for by name fails instead."""
    from pipeline.artifacts import ArtifactError
    from pipeline.export import ensure_onnx

    backend = config.compute.backend
    if backend == "torch" or (backend == "auto" and config.scaling.use_gpu is True):
        return backend
    try:
        ensure_onnx(config.model_uri, card, options)
    except ArtifactError as exc:
        if backend != "auto":
            raise
        echo(f"warning: {exc}; segmenting with torch")
        return "torch"
    return backend


@dataclass
class _Stream:
    """What one pass of the actors did."""

    processed: int = 0
    """Rows (good and error) the actors returned."""
    steady: float | None = None
    """Images/s from the first result to the last: the rate once the actors are up."""
    engine: str | None = None
    """The engine most predictions ran in (each actor chooses; they normally agree)."""
    precision: str | None = None
    """Its precision."""
    channels_last: bool | None = None
    """Whether it ran channels_last (None for the ONNX engines)."""


def _plan(config: SegmentConfig, job: _Job, num_images: int) -> SegmentPlan:
    """The actor pool, reads and batches for this cluster (:mod:`pipeline.plan`)."""
    card = job.card
    footprint = model_footprint(
        card.architecture, card.backbone, card.num_classes, **card.model_options
    )
    return plan_segment(
        detect_resources(),
        config.scaling,
        footprint=footprint,
        decode_cpus=config.data.read.decode_cpus,
        num_images=num_images,
    )


def _stream(
    config: SegmentConfig,
    job: _Job,
    todo: pa.Table,
    sizing: SegmentPlan,
    faults: Faults | None,
    tracker: Tracker,
) -> _Stream:
    """Read, decode and segment ``todo`` on Ray Data, writing rows as they arrive."""
    import ray.data

    from pipeline.data.reading import read_decoded

    backend = "torch" if sizing.use_gpu and job.backend == "auto" else job.backend
    plan = ActorPlan(
        model_uri=config.model_uri,
        num_classes=job.card.num_classes,
        threads=sizing.threads,
        batch_pixels=sizing.batch_pixels,
        use_gpu=sizing.use_gpu,
        resize=config.data.resize,
        palette=config.output.palette,
        write_png=config.output.write_png,
        storage=job.options,
        compute=replace(config.compute, backend=backend),
        faults=faults,
    )
    # Blocks of about one actor batch: results stream back (and into files) steadily.
    rows_per_block = min(config.data.read.rows_per_block, sizing.batch_size)
    decoded = read_decoded(
        todo,
        config=replace(
            config.data.read, decode_batch_size=rows_per_block, decode_cpus=sizing.read_cpus
        ),
        num_classes=job.card.num_classes,
        rows_per_block=rows_per_block,
        # Decoded blocks of about the pixel budget, each one actor call: the calls (and the
        # actors' inputs) follow the images' size, and results stream back steadily.
        block_bytes=sizing.batch_pixels * 3,
    )
    results = decoded.map_batches(
        Segmenter,
        fn_constructor_kwargs={"plan": plan},
        batch_format="pyarrow",
        batch_size=None,  # a decoded block: at most batch_size images, about batch_pixels
        # `actors` started at once, growing to `max_actors` where the cluster can (Ray Data's
        # autoscaler asks the cluster's for their bundles), down to one if the cluster loses
        # nodes (a fixed size would wait for the lost capacity, holding the reads' CPUs).
        compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=sizing.max_actors, initial_size=sizing.actors
        ),
        num_cpus=sizing.cpus_per_actor,
        num_gpus=sizing.gpus_per_actor if sizing.use_gpu else None,
        # What the model needs at the pixel budget: Ray packs no more actors on a node than
        # its memory holds.
        memory=sizing.memory_per_actor,
        # Ray Data spreads the actors over the nodes (its default scheduling strategy): a lost
        # node then costs its actors, not all.
    )
    exit_after = None if faults is None else faults.driver_exit_after
    tables = _Tables(job.writer, config.output.rows_per_file, fail_after=exit_after)
    out, first_rows = _Stream(), 0
    computes: collections.Counter[tuple[str, str, bool | None]] = collections.Counter()
    first_batch_at = last_batch_at = 0.0
    for batch in results.iter_batches(batch_format="pyarrow", batch_size=None):
        rows = pa.table(batch)
        tables.write(rows, job.card.class_names, config.model_uri)
        ran = rows.filter(rows["engine"].is_valid()).select(
            ["engine", "precision", "channels_last"]
        )
        computes.update(zip(*(ran[c].to_pylist() for c in ran.column_names), strict=True))
        if not out.processed:
            first_batch_at, first_rows = time.perf_counter(), rows.num_rows
        out.processed += rows.num_rows
        last_batch_at = time.perf_counter()
        tracker.advance(rows.num_rows, errors=int(pc.sum(rows["stage"].is_valid()).as_py() or 0))
    tables.close()
    if last_batch_at > first_batch_at:  # after start-up: actors up, the model loaded
        out.steady = (out.processed - first_rows) / (last_batch_at - first_batch_at)
    if computes:
        (out.engine, out.precision, out.channels_last), _ = computes.most_common(1)[0]
    return out


_PREDICTION_COLUMNS = [
    "image_id",
    "image_uri",
    "height",
    "width",
    "label_map",
    "class_pixel_counts",
    "latency_ms",
]


class _Tables:
    """The driver's writers of one attempt, flushed so that a crash loses nothing silently.

    An image counts as done (skipped by a rerun) once its predictions or errors row is in a
    file, so its class_metrics rows must be in files by then: every flush writes
    class_metrics first, then errors, then predictions. A crash between two of them leaves
    class_metrics rows of images not yet done; the rerun writes them again, and the commit
    keeps only the latest file's rows per image.
    """

    def __init__(self, writer: RunWriter, rows_per_file: int, *, fail_after: int | None) -> None:
        self.rows_per_file = rows_per_file
        self.fail_after = fail_after
        self.written = 0
        self.metrics = writer.writer("class_metrics", writer_id="driver")
        self.errors = writer.writer("errors", writer_id="driver")
        self.predictions = writer.writer("predictions", writer_id="driver")
        self.order = (self.metrics, self.errors, self.predictions)

    def write(self, batch: pa.Table, class_names: list[str], model: str) -> None:
        """Split one batch of actor output into the three tables; flush when one is full."""
        _split_rows(self, batch, class_names, model)
        full = max(self.errors.buffered_rows, self.predictions.buffered_rows) >= self.rows_per_file
        if full or self.predictions.buffered_bytes >= _MAX_FILE_BYTES:
            self.written += self.predictions.buffered_rows
            for w in self.order:
                w.flush()
            if self.fail_after is not None and self.written >= self.fail_after:
                print(f"fault injection: exiting after {self.written} predictions", flush=True)
                os._exit(1)

    def close(self) -> None:
        """Write what is buffered, in the safe order."""
        for w in self.order:
            w.close()


def _split_rows(tables: _Tables, batch: pa.Table, class_names: list[str], model: str) -> None:
    """Buffer one batch of actor output as predictions, class_metrics and errors rows."""
    failed = batch["stage"].is_valid()
    errors = batch.filter(failed)
    if errors.num_rows:
        tables.errors.write(
            errors.select(["image_id", "image_uri", "stage", "error_type", "message"])
        )
    good = batch.filter(pc.invert(failed))
    if not good.num_rows:
        return
    predictions = good.select(_PREDICTION_COLUMNS).append_column(
        "model_uri", pa.array([model] * good.num_rows, pa.string())
    )
    tables.predictions.write(predictions)
    scored = good.filter(good["gt_pixels"].is_valid())
    rows: dict[str, list[Any]] = {
        name: [] for name in ("image_id", "class_id", "class_name", *COUNTS, "iou")
    }
    for row in scored.select(["image_id", *COUNTS]).to_pylist():
        for class_id, (gt, pred, inter, union) in enumerate(
            zip(*(row[n] for n in COUNTS), strict=True)
        ):
            if gt == 0 and pred == 0:
                continue  # only classes present in the ground truth or the prediction
            for name, value in zip(
                ("image_id", "class_id", "class_name", *COUNTS, "iou"),
                (
                    row["image_id"],
                    class_id,
                    class_names[class_id],
                    gt,
                    pred,
                    inter,
                    union,
                    inter / union if union else None,
                ),
                strict=True,
            ):
                rows[name].append(value)
    if rows["image_id"]:
        tables.metrics.write(rows)


def _run_totals(
    writer: RunWriter, num_classes: int
) -> tuple[dict[str, np.ndarray] | None, int, int]:
    """Per-class sums over every scored image of the run (all attempts), and row counts."""
    totals = {name: np.zeros(num_classes, dtype=np.int64) for name in COUNTS}
    scored = False
    for part in writer.iter_written("class_metrics", ["class_id", *COUNTS]):
        if not part.num_rows:
            continue
        scored = True
        ids = part["class_id"].to_numpy()
        for name in COUNTS:
            np.add.at(totals[name], ids, part[name].to_numpy())
    num_images = sum(p.num_rows for p in writer.iter_written("predictions", ["image_id"]))
    num_errors = sum(p.num_rows for p in writer.iter_written("errors", ["image_uri"]))
    return (totals if scored else None), num_images, num_errors
