"""Batch segmentation over a bucket: Ray Data actors writing label maps and metrics tables.

Usage:
    fcnpipe segment INPUT_URI --model MODEL_URI --output OUT_URI [--run-id ID --split val \\
        --batch-size 8 --actors 2 --use-gpu]

The driver (:func:`segment`) loads the model card (failing early on a bad model URI),
lists the input (a dataset root in any layout, a manifest, or any prefix of images),
leaves out the images a crashed attempt of the same run already wrote, and streams the
rest through Ray Data: read + bounded decode in tasks (:func:`pipeline.datasets.read_decoded`),
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

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.artifacts import load_card
from pipeline.datasets import DatasetConfig, DatasetError, load_manifest, manifest_meta
from pipeline.faults import Faults
from pipeline.storage import StorageOptions
from pipeline.tables import RunWriter, is_committed, new_run_id, validate_run_id

__all__ = ["SEGMENT_OUTPUT", "SegmentConfig", "SegmentResult", "Segmenter", "segment"]

SEGMENT_OUTPUT = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("label_map", pa.binary()),
        pa.field("class_pixel_counts", pa.list_(pa.int64())),
        pa.field("latency_ms", pa.float64()),
        # Per-class counts of the image's confusion matrix (null without a mask):
        pa.field("gt_pixels", pa.list_(pa.int64())),
        pa.field("pred_pixels", pa.list_(pa.int64())),
        pa.field("intersection", pa.list_(pa.int64())),
        pa.field("union", pa.list_(pa.int64())),
        pa.field("stage", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("message", pa.string()),
    ]
)
"""What a :class:`Segmenter` returns: one row per input row, a prediction or an error."""

_COUNTS = ("gt_pixels", "pred_pixels", "intersection", "union")
_NO_LIMIT = 2**62
_MAX_FILE_BYTES = 64 * 2**20  # of predictions (label maps) buffered before a flush


@dataclass(frozen=True, kw_only=True)
class SegmentConfig:
    """One segmentation job: which images, which model, where the tables go, how wide."""

    # Read from JSON (flow parameters, Ray Jobs) by pydantic: an unknown field is an error,
    # not silently dropped. A plain dict, so this module needs no pydantic import.
    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}

    input_uri: str
    """Dataset root (VOC, images/ + masks/, or any prefix of images) or a manifest."""
    model_uri: str
    """Model artifact (``OUT/models/<run_id>``) to segment with."""
    output_uri: str
    """Output root of the tables."""
    run_id: str | None = None
    """Run id (a letter, then letters, digits, ``._-``); None: a new one."""
    split: str | None = None
    """Only this split (e.g. ``val``); None: every image."""
    batch_size: int = 8
    """Images per actor call (images of equal size run as one batch)."""
    actors: int = 1
    """Inference actors in the pool."""
    use_gpu: bool = False
    """Give each actor a GPU (``gpus_per_actor``)."""
    gpus_per_actor: float = 1.0
    """GPUs per actor with ``use_gpu`` (fractions share a GPU)."""
    cpus_per_actor: float = 1.0
    """CPUs Ray reserves per actor."""
    threads_per_actor: int | None = None
    """torch threads per actor; None: ``max(1, int(cpus_per_actor))``."""
    resize: int | None = None
    """Run the model with the longer image side scaled to this, then upsample the scores
    back: label maps are always at the image's own size. None: no resizing."""
    palette: bool = False
    """Write label-map PNGs with the VOC colour palette (pixel values are still class ids)."""
    write_png: str | None = None
    """Also write each label map as ``<write_png>/<image_id>.png``."""
    rows_per_file: int = 2000
    """Rows per Parquet file (also what a crash can cost: unflushed rows are redone)."""
    overwrite: bool = False
    """Replace a committed run with the same id."""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    """Reading and decoding options (limits, layout, storage)."""

    def __post_init__(self) -> None:
        if self.run_id is not None:
            validate_run_id(self.run_id)
        for name in ("batch_size", "actors", "rows_per_file"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cpus_per_actor <= 0 or (self.use_gpu and self.gpus_per_actor <= 0):
            raise ValueError("cpus_per_actor (and gpus_per_actor with use_gpu) must be > 0")
        if self.threads_per_actor is not None and self.threads_per_actor < 1:
            raise ValueError(f"threads_per_actor must be >= 1, got {self.threads_per_actor}")
        if self.resize is not None and self.resize < 8:
            raise ValueError(f"resize must be >= 8 pixels, got {self.resize}")
        if self.dataset.num_classes is not None:
            raise ValueError("the model's card sets num_classes; leave DatasetConfig's unset")

    @property
    def threads(self) -> int:
        """torch threads per actor."""
        return self.threads_per_actor or max(1, int(self.cpus_per_actor))


@dataclass(frozen=True)
class SegmentResult:
    """What a segmentation run produced."""

    run_id: str
    """The run id."""
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


@dataclass(frozen=True, kw_only=True)
class _ActorPlan:
    model_uri: str
    num_classes: int
    threads: int
    use_gpu: bool
    resize: int | None
    palette: bool
    write_png: str | None
    storage: StorageOptions
    faults: Faults | None = None


class Segmenter:
    """A Ray Data actor: the model loaded once, decoded rows in, prediction rows out.

    Args:
        plan: What to load and how to run it.
    """

    def __init__(self, plan: _ActorPlan) -> None:
        import torch

        from fcn.transforms import eval_transform
        from pipeline.artifacts import load_artifact

        torch.set_num_threads(plan.threads)
        self.plan = plan
        self.device = torch.device("cuda" if plan.use_gpu else "cpu")
        self.model, card = load_artifact(plan.model_uri, device=self.device, options=plan.storage)
        self.to_input = eval_transform(normalization=card.normalization_name)
        self.mirror = (
            None if plan.write_png is None else storage.resolve(plan.write_png, plan.storage)
        )
        self.calls = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Segment one batch of decoded rows; errors pass through as error rows."""
        import torch

        from fcn.metrics import confusion_matrix, per_class_counts
        from fcn.palette import encode_label_png
        from pipeline.datasets import samples_from_batch

        faults = self.plan.faults
        if faults is not None and faults.actor_stall_after == self.calls:
            import ray

            node = ray.get_runtime_context().get_node_id()
            faults.stall(f"actor-{os.getpid()}", node_id=node)
        self.calls += 1
        n = self.plan.num_classes
        rows = batch.select(["image_id", "image_uri", "error_stage", "error_type", "error_message"])
        out: dict[str, list[Any]] = {name: [None] * batch.num_rows for name in SEGMENT_OUTPUT.names}
        index = {image_id: i for i, image_id in enumerate(rows["image_id"].to_pylist())}
        for i, row in enumerate(rows.to_pylist()):
            out["image_id"][i] = row["image_id"]
            out["image_uri"][i] = row["image_uri"]
            out["stage"][i] = row["error_stage"]
            out["error_type"][i] = row["error_type"]
            out["message"][i] = row["error_message"]
        samples = samples_from_batch(batch)
        groups: dict[tuple[int, int], list[Any]] = {}
        for sample in samples:
            groups.setdefault(sample.image.shape[:2], []).append(sample)
        for group in groups.values():
            began = time.perf_counter()
            try:
                inputs = torch.stack([self.to_input(s.image, None)[0] for s in group])
                labels = self._predict(inputs.to(self.device)).cpu().numpy().astype(np.uint8)
            except Exception as exc:  # e.g. out of memory on one huge image: not the batch
                for s in group:
                    i = index[s.image_id]
                    out["stage"][i], out["error_type"][i] = "infer", type(exc).__name__
                    out["message"][i] = f"{s.image_uri}: inference failed: {exc}"
                continue
            latency = (time.perf_counter() - began) * 1000 / len(group)
            for sample, label in zip(group, labels, strict=True):
                i = index[sample.image_id]
                png = encode_label_png(label, palette=self.plan.palette)
                out["height"][i], out["width"][i] = label.shape
                out["label_map"][i] = png
                out["class_pixel_counts"][i] = np.bincount(label.ravel(), minlength=n)[:n].tolist()
                out["latency_ms"][i] = latency
                if sample.mask is not None:
                    counts = per_class_counts(confusion_matrix(label, sample.mask, n))
                    for name in _COUNTS:
                        out[name][i] = counts[name].tolist()
                if self.mirror is not None:
                    storage.write_bytes(self.mirror.join(f"{sample.image_id}.png"), png)
        return pa.table(out, schema=SEGMENT_OUTPUT)

    def _predict(self, images: Any) -> Any:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            size = images.shape[-2:]
            if self.plan.resize is not None and max(size) != self.plan.resize:
                scale = self.plan.resize / max(size)
                small = [max(1, round(side * scale)) for side in size]
                inputs = F.interpolate(images, size=small, mode="bilinear", align_corners=False)
                logits = F.interpolate(
                    self.model(inputs), size=list(size), mode="bilinear", align_corners=False
                )
            else:
                logits = self.model(images)
            return logits.argmax(1)


# ----------------------------------------------------------------------------- driver


def segment(
    config: SegmentConfig,
    *,
    echo: Callable[[str], None] = print,
    num_cpus: int | None = None,
    faults: Faults | None = None,
) -> SegmentResult:
    """Segment every image of the input into the run's committed tables.

    Args:
        config: The job.
        echo: Where the summary line goes.
        num_cpus: CPUs of the embedded Ray, if this call starts one.
        faults: Testing only: where actors stall or the driver exits (``pipeline.faults``).

    Raises:
        pipeline.artifacts.ArtifactError: The model artifact is missing or broken.
        pipeline.datasets.DatasetError: Nothing to read at the input.
        pipeline.tables.RunExistsError: The run is committed and ``overwrite`` is off.
    """
    import ray.data

    from pipeline.cluster import ensure_ray
    from pipeline.datasets import read_decoded

    started = datetime.now(UTC)
    clock = time.perf_counter()
    run_id = config.run_id or new_run_id("segment")
    options = config.dataset.storage.with_environment()
    out = storage.resolve(config.output_uri, options)
    card = load_card(config.model_uri, options)
    if config.write_png is not None:
        storage.resolve(config.write_png, options)  # a bad URI fails now, not in an actor
    if is_committed(out, run_id) and not config.overwrite:
        RunWriter(out, run_id, "segment")  # raises RunExistsError with the message
    if not storage.exists(config.input_uri, options):
        raise DatasetError(f"nothing at {config.input_uri}")
    manifest = load_manifest(
        config.input_uri, config.split, layout=config.dataset.layout, options=options
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
    # The driver decides when files are written (see _Tables), not a per-table size limit.
    writer = RunWriter(
        out, run_id, "segment", overwrite=config.overwrite, max_rows=_NO_LIMIT, max_bytes=_NO_LIMIT
    )
    done = writer.existing_ids("predictions") | (writer.existing_ids("errors") - {None})
    todo = manifest.filter(
        pc.invert(pc.is_in(manifest["image_id"], pa.array(sorted(done), pa.string())))
    )
    echo(
        f"run {run_id}: {todo.num_rows} image(s) to segment"
        + (
            f", {manifest.num_rows - todo.num_rows} already written by an earlier attempt"
            if done
            else ""
        )
    )
    processed = 0
    steady: float | None = None
    if todo.num_rows:
        ensure_ray(num_cpus=num_cpus)
        _check_fits(config)
        plan = _ActorPlan(
            model_uri=config.model_uri,
            num_classes=card.num_classes,
            threads=config.threads,
            use_gpu=config.use_gpu,
            resize=config.resize,
            palette=config.palette,
            write_png=config.write_png,
            storage=options,
            faults=faults,
        )
        # Blocks of about one actor batch: results stream back (and into files) steadily.
        rows_per_block = min(config.dataset.rows_per_block, config.batch_size)
        decoded = read_decoded(
            todo,
            config=replace(
                config.dataset,
                num_classes=card.num_classes,
                require_masks=False,
                rows_per_block=rows_per_block,
                batch_size=rows_per_block,
            ),
        )
        results = decoded.map_batches(
            Segmenter,
            fn_constructor_kwargs={"plan": plan},
            batch_format="pyarrow",
            batch_size=config.batch_size,
            # Up to `actors`, started at once; down to one if the cluster loses nodes (a fixed
            # size would wait for the lost capacity, holding the CPUs the reads need).
            compute=ray.data.ActorPoolStrategy(
                min_size=1, max_size=config.actors, initial_size=config.actors
            ),
            num_cpus=config.cpus_per_actor,
            num_gpus=config.gpus_per_actor if config.use_gpu else None,
            # One actor per node where possible: a lost node then costs one actor, not all.
            scheduling_strategy="SPREAD",
        )
        exit_after = None if faults is None else faults.driver_exit_after
        tables = _Tables(writer, config.rows_per_file, fail_after=exit_after)
        first_batch_at = last_batch_at = 0.0
        for batch in results.iter_batches(batch_format="pyarrow", batch_size=None):
            rows = pa.table(batch)
            tables.write(rows, card.class_names, config.model_uri)
            if not processed:
                first_batch_at, first_rows = time.perf_counter(), rows.num_rows
            processed += rows.num_rows
            last_batch_at = time.perf_counter()
        tables.close()
        if last_batch_at > first_batch_at:  # after start-up: actors up, the model loaded
            steady = (processed - first_rows) / (last_batch_at - first_batch_at)
    seconds = time.perf_counter() - clock
    totals, num_images, num_errors = _run_totals(writer, card.num_classes)
    scores = _scores_from_counts(totals) if totals is not None else None
    images_per_s = processed / seconds if seconds > 0 else 0.0
    finished = datetime.now(UTC)
    writer.write(
        "runs",
        [
            {
                "kind": "segment",
                "input_uri": config.input_uri,
                "model_uri": config.model_uri,
                "num_images": num_images,
                "num_errors": num_errors,
                "pixel_acc": None if scores is None else scores["pixel_acc"],
                "mean_acc": None if scores is None else scores["mean_acc"],
                "mean_iou": None if scores is None else scores["mean_iou"],
                "fw_iou": None if scores is None else scores["fw_iou"],
                "class_names": list(card.class_names),
                "class_iou": None if scores is None else scores["iou"],
                "started_at": started,
                "finished_at": finished,
                "images_per_s": images_per_s,
            }
        ],
    )
    extra: dict[str, Any] = {"model_uri": config.model_uri}
    if totals is not None:
        extra["class_totals"] = {name: totals[name].tolist() for name in _COUNTS}
    writer.commit(extra, finished_at=finished)
    summary = f"run {run_id}: {num_images} images, {num_errors} errors, {images_per_s:.1f} images/s"
    if scores is not None and scores["mean_iou"] is not None:
        summary += f", mean IoU {scores['mean_iou']:.3f}"
    echo(summary)
    return SegmentResult(
        run_id=run_id,
        num_images=num_images,
        num_errors=num_errors,
        scores=scores,
        class_names=list(card.class_names),
        images_per_s=images_per_s,
        skipped=manifest.num_rows - todo.num_rows,
        seconds=time.perf_counter() - clock,
        steady_images_per_s=steady,
    )


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


def _check_fits(config: SegmentConfig) -> None:
    """Refuse a pool that cannot start on this cluster (Ray Data would wait for it forever)."""
    import ray

    resources = ray.cluster_resources()
    cpus = float(resources.get("CPU", 0.0))
    if config.cpus_per_actor + config.dataset.num_cpus > cpus:
        raise ValueError(
            f"an actor ({config.cpus_per_actor:g} CPU) and a read task "
            f"({config.dataset.num_cpus:g} CPU) do not fit this Ray cluster's {cpus:g} CPUs: "
            "lower --cpus-per-actor"
        )
    if config.use_gpu and float(resources.get("GPU", 0.0)) < config.gpus_per_actor:
        raise ValueError(
            f"--use-gpu: this Ray cluster has {resources.get('GPU', 0):g} GPU(s), an actor "
            f"needs {config.gpus_per_actor:g}"
        )


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
        name: [] for name in ("image_id", "class_id", "class_name", *_COUNTS, "iou")
    }
    for row in scored.select(["image_id", *_COUNTS]).to_pylist():
        for class_id, (gt, pred, inter, union) in enumerate(
            zip(*(row[n] for n in _COUNTS), strict=True)
        ):
            if gt == 0 and pred == 0:
                continue  # only classes present in the ground truth or the prediction
            for name, value in zip(
                ("image_id", "class_id", "class_name", *_COUNTS, "iou"),
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
    totals = {name: np.zeros(num_classes, dtype=np.int64) for name in _COUNTS}
    scored = False
    for part in writer.iter_written("class_metrics", ["class_id", *_COUNTS]):
        if not part.num_rows:
            continue
        scored = True
        ids = part["class_id"].to_numpy()
        for name in _COUNTS:
            np.add.at(totals[name], ids, part[name].to_numpy())
    num_images = sum(p.num_rows for p in writer.iter_written("predictions", ["image_id"]))
    num_errors = sum(p.num_rows for p in writer.iter_written("errors", ["image_uri"]))
    return (totals if scored else None), num_images, num_errors


def _scores_from_counts(totals: dict[str, np.ndarray]) -> dict[str, Any]:
    """The paper's metrics from per-class sums (all four need only these, not the matrix)."""
    gt, inter, union = totals["gt_pixels"], totals["intersection"], totals["union"]
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = np.where(gt > 0, inter / np.maximum(gt, 1), np.nan)
        iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    labelled = gt.sum()
    present = ~np.isnan(iou)
    return {
        "pixel_acc": float(inter.sum() / labelled) if labelled else None,
        "mean_acc": float(np.nanmean(acc)) if (gt > 0).any() else None,
        "mean_iou": float(np.nanmean(iou)) if present.any() else None,
        "fw_iou": float((gt[gt > 0] / labelled * iou[gt > 0]).sum()) if labelled else None,
        "iou": [None if math.isnan(v) else float(v) for v in iou],
    }
