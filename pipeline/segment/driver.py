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
prediction, or an error. Ray Data write tasks (:func:`pipeline.segment.write.write_batch`)
turn every ``rows_per_file`` of those into data files of the ``predictions``,
``class_metrics`` and ``errors`` tables; the driver receives a few counts per file, writes the
``runs`` row, and commits the run in one Iceberg commit: nothing is visible before it.

Every input object ends in exactly one of ``predictions`` or ``errors``. Rerunning a
crashed run with the same ``--run-id`` skips the images already written and never
duplicates a row; ``--overwrite`` replaces a committed run.
"""

from __future__ import annotations

import collections
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fcn.metrics import nan_to_none, scores_from_counts
from pipeline import storage
from pipeline.artifacts import ModelCard, load_card
from pipeline.console import progress_sink
from pipeline.data.layouts import DatasetError, load_manifest, manifest_meta, manifest_versions
from pipeline.faults import Faults
from pipeline.plan import SegmentPlan, detect_resources, model_footprint, plan_segment
from pipeline.progress import ProgressSink, Tracker
from pipeline.segment.actor import COUNTS, SEGMENT_OUTPUT, ActorPlan, Segmenter
from pipeline.segment.config import SegmentConfig
from pipeline.segment.engines import Backend
from pipeline.segment.tiles import Tiling, cut_rows, label_map_dir
from pipeline.segment.write import WritePlan, strip_rows, write_batch
from pipeline.storage import StorageOptions
from pipeline.store.read import TableReader, check_not_committed
from pipeline.store.runs import RunWriter
from pipeline.tables import new_run_id, runs_row

__all__ = ["SegmentResult", "segment"]


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
    unchanged: int = 0
    """Images left out because the stream's committed runs have them in this version with
    this model (``--stream``)."""


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
    unchanged = 0
    if config.stream is not None:
        todo, unchanged = _unseen(config, job, todo)
    echo(
        f"run {job.run_id}: {todo.num_rows} image(s) to segment"
        + (f", {skipped} already written by an earlier attempt" if done else "")
        + (f", {unchanged} unchanged since stream {config.stream}'s runs" if unchanged else "")
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
    if config.stream is not None:  # what exists now: the latest view drops the rest
        job.writer.write("inputs", job.manifest.select(["image_id", "image_uri", "image_version"]))
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
                stream=config.stream,
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
        unchanged=unchanged,
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
    check_not_committed(out, run_id, config.overwrite, options)
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
    # Never null from here on: the key of incremental runs, recorded with every row.
    manifest = manifest.set_column(
        manifest.schema.get_field_index("image_version"),
        "image_version",
        manifest_versions(manifest),
    )
    if meta.class_names is not None and len(meta.class_names) != card.num_classes:
        raise DatasetError(
            f"{config.input_uri} has {len(meta.class_names)} classes, the model "
            f"{config.model_uri} {card.num_classes}: masks would be scored against other classes"
        )
    backend = _onnx_ready(config, card, options, echo)
    writer = RunWriter(out, run_id, "segment", overwrite=config.overwrite)
    return _Job(
        run_id=run_id,
        options=options,
        card=card,
        manifest=manifest,
        writer=writer,
        backend=backend,
    )


def _unseen(config: SegmentConfig, job: _Job, todo: pa.Table) -> tuple[pa.Table, int]:
    """The rows of ``todo`` that no committed run of the stream with this model has seen in
    their current version (a prediction or an error row with the same image URI and version),
    and how many were left out. A different model for the stream has seen nothing."""
    reader = TableReader(storage.resolve(config.output_uri, job.options))
    runs = reader.read("runs", columns=["run_id", "kind", "model_uri", "stream"])
    mine = pc.and_(
        pc.and_(pc.equal(runs["stream"], config.stream), pc.equal(runs["kind"], "segment")),
        pc.and_(
            pc.equal(runs["model_uri"], config.model_uri), pc.not_equal(runs["run_id"], job.run_id)
        ),
    )
    run_ids = runs.filter(mine)["run_id"].to_pylist()
    if not run_ids or not todo.num_rows:
        return todo, 0
    columns = ["image_uri", "image_version"]
    seen = [reader.read(table, run_ids, columns=columns) for table in ("predictions", "errors")]
    seen_keys = pa.chunked_array([_version_key(t) for t in seen], pa.string())
    fresh = pc.invert(pc.is_in(_version_key(todo), value_set=seen_keys.combine_chunks()))
    out = todo.filter(fresh)
    return out, todo.num_rows - out.num_rows


def _version_key(rows: pa.Table) -> pa.Array:
    """``image_uri`` and ``image_version`` as one string per row (null without a version)."""
    key = pc.binary_join_element_wise(rows["image_uri"], rows["image_version"], "\n")
    return key.combine_chunks() if isinstance(key, pa.ChunkedArray) else key


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

    from pipeline.data.reading import manifest_blocks, read_decoded

    backend = "torch" if sizing.use_gpu and job.backend == "auto" else job.backend
    tiling = None
    if config.data.tile is not None:
        tiling = Tiling(tile=config.data.tile, overlap=config.data.overlap)
    out_dir = label_map_dir(storage.resolve(config.output_uri, job.options), job.run_id)
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
        tiling=tiling,
        parts_uri=out_dir.join("_parts").uri,
        faults=faults,
    )
    # Blocks of about one actor batch: results stream back (and into files) steadily.
    rows_per_block = min(config.data.read.rows_per_block, sizing.batch_size)
    read_config = replace(
        config.data.read, decode_batch_size=rows_per_block, decode_cpus=sizing.read_cpus
    )
    # Decoded blocks of about the pixel budget, each one actor call: the calls (and the
    # actors' inputs) follow the images' size, and results stream back steadily.
    block_bytes = sizing.batch_pixels * 3
    if tiling is None:
        decoded = read_decoded(
            todo,
            config=read_config,
            num_classes=job.card.num_classes,
            rows_per_block=rows_per_block,
            block_bytes=block_bytes,
        )
    else:
        # Large images become one row (and block) per strip: tiles.cut_rows.
        decoded = manifest_blocks(todo, rows_per_block, block_bytes).map_batches(
            functools.partial(
                cut_rows,
                config=replace(read_config, storage=job.options),
                tiling=tiling,
                num_classes=job.card.num_classes,
            ),
            batch_format="pyarrow",
            batch_size=rows_per_block,
            num_cpus=sizing.read_cpus,
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
    # Data files are written beside the actors, every `rows_per_file` rows: the label maps
    # never travel through the driver, which gets a row of counts per batch.
    write_plan = _write_plan(config, job)
    written = results.map_batches(
        functools.partial(write_batch, plan=write_plan),
        batch_format="pyarrow",
        batch_size=config.output.rows_per_file,
        # The plan's read share beside the actors, in turns with the read tasks.
        num_cpus=sizing.write_cpus,
    )
    exit_after = None if faults is None else faults.driver_exit_after
    assembly = None
    if tiling is not None:
        assembly = _Assembly(
            tiling,
            out_dir,
            num_classes=job.card.num_classes,
            palette=config.output.palette,
            inline_max_pixels=config.output.inline_max_pixels,
            cpus=sizing.read_cpus,
            exit_after=None if faults is None else faults.strips_exit_after,
        )
    out, first_rows, in_files = _Stream(), 0, 0
    computes: collections.Counter[tuple[str, str, bool | None]] = collections.Counter()
    first_batch_at = last_batch_at = 0.0

    def assembled(rows: pa.Table) -> None:
        if rows.num_rows:  # the few rows of the large images done: written here, as a task would
            finished(write_batch(rows, write_plan))

    def finished(counts: pa.Table) -> None:
        nonlocal first_batch_at, first_rows, last_batch_at, in_files
        rows = sum(pc.sum(counts[name]).as_py() or 0 for name in ("predictions", "errors"))
        for row in counts.filter(counts["engine"].is_valid()).to_pylist():
            computes[(row["engine"], row["precision"], row["channels_last"])] += row["compute_rows"]
        if not rows:
            return
        if not out.processed:
            first_batch_at, first_rows = time.perf_counter(), rows
        out.processed += rows
        last_batch_at = time.perf_counter()
        tracker.advance(rows, errors=int(pc.sum(counts["errors"]).as_py() or 0))
        in_files += pc.sum(counts["predictions"]).as_py() or 0
        if exit_after is not None and in_files >= exit_after:
            print(f"fault injection: exiting after {in_files} predictions", flush=True)
            os._exit(1)

    for batch in written.iter_batches(batch_format="pyarrow", batch_size=None):
        counts = pa.table(batch)
        finished(counts)
        if assembly is not None:
            for strips in strip_rows(counts):
                assembly.take(strips)
            assembled(assembly.done(wait=False))
    if assembly is not None:
        assembled(assembly.done(wait=True))
        # Every tiled image is in a row now (or an error): parts left by a crashed attempt
        # of images that then failed go too.
        if storage.exists(out_dir.join("_parts")):
            storage.delete(out_dir.join("_parts"))
    if last_batch_at > first_batch_at:  # after start-up: actors up, the model loaded
        out.steady = (out.processed - first_rows) / (last_batch_at - first_batch_at)
    if computes:
        (out.engine, out.precision, out.channels_last), _ = computes.most_common(1)[0]
    return out


class _Assembly:
    """The strips of a tiled run's large images, gathered until each image is whole.

    :meth:`take` keeps the strip rows of a batch (and returns the others); once every
    strip of an image is back, a Ray task assembles its label map
    (:func:`pipeline.segment.tiles.assemble`), and :meth:`done` turns the finished ones
    into one :data:`SEGMENT_OUTPUT` row each: a prediction with the summed counts, or the
    image's first error. No row exists for an image before its label map does.
    """

    def __init__(
        self,
        tiling: Tiling,
        out_dir: storage.Location,
        *,
        num_classes: int,
        palette: bool,
        inline_max_pixels: int,
        cpus: float,
        exit_after: int | None,
    ) -> None:
        import ray

        from pipeline.segment.tiles import assemble

        self.tiling = tiling
        self.out_dir = out_dir
        self.num_classes = num_classes
        self.palette = palette
        self.inline_max_pixels = inline_max_pixels
        self.exit_after = exit_after
        self.strips_seen = 0
        self.images: dict[str, dict[str, Any]] = {}
        self.pending: dict[Any, dict[str, Any]] = {}
        self.ready: list[dict[str, Any]] = []
        self.assemble: Any = ray.remote(num_cpus=cpus, max_retries=2)(cast(Any, assemble))

    def take(self, rows: pa.Table) -> pa.Table:
        """The rows that are not strips; the strips are gathered."""
        strips = rows["strip"].is_valid()
        for row in rows.filter(strips).to_pylist():
            self._strip(row)
        return rows.filter(pc.invert(strips))

    def _strip(self, row: dict[str, Any]) -> None:
        image = self.images.setdefault(
            row["image_id"], {"row": dict(row), "seen": set(), "counts": {}, "latency": 0.0}
        )
        image["seen"].add(row["strip"])
        self.strips_seen += 1
        if row["stage"] is not None and image["row"]["stage"] is None:
            image["row"].update(stage=row["stage"], error_type=row["error_type"])
            image["row"]["message"] = row["message"]
        for name in ("class_pixel_counts", *COUNTS):
            if row[name] is not None:
                total = image["counts"].get(name)
                value = np.asarray(row[name], np.int64)
                image["counts"][name] = value if total is None else total + value
        image["latency"] += row["latency_ms"] or 0.0
        if self.exit_after is not None and self.strips_seen >= self.exit_after:
            print(f"fault injection: exiting after {self.strips_seen} strips", flush=True)
            os._exit(1)
        if len(image["seen"]) < row["strips"]:
            return
        del self.images[row["image_id"]]
        if image["row"]["stage"] is not None:
            storage.delete(self.out_dir.join("_parts", row["image_id"]))
            self.ready.append(image)
            return
        future = self.assemble.remote(
            image_id=row["image_id"],
            height=row["height"],
            width=row["width"],
            tiling=self.tiling,
            num_classes=self.num_classes,
            out_dir=self.out_dir,
            palette=self.palette,
            inline_max_pixels=self.inline_max_pixels,
        )
        self.pending[future] = image

    def done(self, *, wait: bool) -> pa.Table:
        """Rows of the images assembled (or failed) since the last call; with ``wait``, of
        every image still out."""
        import ray

        if self.pending:
            finished, _ = ray.wait(
                list(self.pending),
                num_returns=len(self.pending) if wait else 1,
                timeout=None if wait else 0,
            )
            for future in finished:
                image = self.pending.pop(future)
                try:
                    made = ray.get(future)
                except Exception as exc:
                    cause = getattr(exc, "cause", exc)
                    image["row"].update(stage="assemble", error_type=type(cause).__name__)
                    image["row"]["message"] = (
                        f"{image['row']['image_uri']}: assembling the label map failed: {cause}"
                    )
                else:
                    image["made"] = made
                self.ready.append(image)
        rows = [self._row(image) for image in self.ready]
        self.ready = []
        return pa.Table.from_pylist(rows, schema=SEGMENT_OUTPUT)

    def _row(self, image: dict[str, Any]) -> dict[str, Any]:
        row = {name: image["row"].get(name) for name in SEGMENT_OUTPUT.names}
        row["strip"] = row["strips"] = None
        made = image.get("made")
        if made is None:  # an error: the image's first
            for name in ("height", "width", "class_pixel_counts", "latency_ms", *COUNTS):
                row[name] = None
            return row
        counts = dict(image["counts"])
        for name, value in made["counts"].items():
            counts[name] = counts[name] + np.asarray(value, np.int64)
        for name in ("class_pixel_counts", *COUNTS):
            row[name] = counts[name].tolist() if name in counts else None
        row["label_map"] = made["label_map"]
        row["label_map_uri"] = made["label_map_uri"]
        row["latency_ms"] = image["latency"] + made["seconds"] * 1000
        return row


def _write_plan(config: SegmentConfig, job: _Job) -> WritePlan:
    """What the write tasks need: the run's data directories and schemas, the names."""
    return WritePlan(
        targets={t: job.writer.target(t) for t in ("predictions", "class_metrics", "errors")},
        class_names=tuple(job.card.class_names),
        model_uri=config.model_uri,
    )


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
