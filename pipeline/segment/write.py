"""The segmentation run's table files, written by Ray Data tasks beside the actors.

:func:`write_batch` takes one batch of :class:`~pipeline.segment.actor.Segmenter` output (a
prediction or an error per image), splits it into ``predictions``, ``class_metrics`` and
``errors`` rows and writes them as data files of the run (:mod:`pipeline.store.files`), then
returns one small row saying what it wrote. So the label maps go from the actors to the
storage through the cluster's workers, and the driver receives a few numbers per file: it only
commits (:meth:`pipeline.store.runs.RunWriter.commit`).

An image counts as done (skipped by a rerun) once its ``predictions`` or ``errors`` row is in a
file, so its ``class_metrics`` rows must be in files by then: each batch writes
``class_metrics`` first, then ``errors``, then ``predictions``. A crash between two of them
leaves ``class_metrics`` rows of images not done; the rerun writes them again, and the commit
keeps only the latest file's rows per image. A task that Ray retries (a lost node) writes its
batch again under new names: the same rule keeps one copy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.segment.actor import COUNTS
from pipeline.store.files import TableTarget, TableWriter

__all__ = ["WRITTEN", "WritePlan", "split_rows", "strip_rows", "write_batch"]

MAX_FILE_BYTES = 64 * 2**20
"""Arrow bytes of ``predictions`` (label maps, mostly) per data file, at most."""

WRITTEN = pa.schema(
    [
        pa.field("predictions", pa.int64()),
        pa.field("errors", pa.int64()),
        pa.field("class_metrics", pa.int64()),
        pa.field("label_map_bytes", pa.int64()),
        pa.field("engine", pa.string()),
        pa.field("precision", pa.string()),
        pa.field("channels_last", pa.bool_()),
        pa.field("compute_rows", pa.int64()),
        pa.field("strip_rows", pa.binary()),
    ]
)
"""What :func:`write_batch` returns: rows written per table, the compute the batch's
predictions ran in (its most common engine, precision and layout, and on how many rows),
and the batch's strip rows of a tiled run (an Arrow IPC stream, or null): they carry counts
only, and go to the driver, which assembles each large image once its strips are back."""

_PREDICTION_COLUMNS = [
    "image_id",
    "image_uri",
    "height",
    "width",
    "label_map",
    "class_pixel_counts",
    "latency_ms",
    "label_map_uri",
    "image_version",
]
_ERROR_COLUMNS = ["image_id", "image_uri", "stage", "error_type", "message", "image_version"]
_METRIC_COLUMNS = ("image_id", "class_id", "class_name", *COUNTS, "iou")


@dataclass(frozen=True, kw_only=True)
class WritePlan:
    """What every write task needs (made by the driver; pickled, no catalog)."""

    targets: dict[str, TableTarget]
    """The run's ``predictions``, ``class_metrics`` and ``errors`` targets."""
    class_names: tuple[str, ...]
    """Name per class id."""
    model_uri: str
    """The model, as the predictions rows name it."""


def write_batch(batch: pa.Table, plan: WritePlan) -> pa.Table:
    """Write one batch of actor output to the run's data files; one row of counts back.

    Args:
        batch: Rows of :data:`pipeline.segment.actor.SEGMENT_OUTPUT`.
        plan: Targets and names.
    """
    strips = None
    if "strip" in batch.column_names and batch["strip"].null_count < batch.num_rows:
        is_strip = batch["strip"].is_valid()
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as stream:
            stream.write_table(batch.filter(is_strip))
        strips = sink.getvalue().to_pybytes()
        batch = batch.filter(pc.invert(is_strip))
    tables = split_rows(batch, plan.class_names, plan.model_uri)
    writer_id = f"w{os.getpid()}"
    # The safe order (module docstring): an image is done once its predictions row is.
    for name in ("class_metrics", "errors", "predictions"):
        rows = tables[name]
        if rows.num_rows:
            with TableWriter(
                plan.targets[name], writer_id=writer_id, max_rows=2**62, max_bytes=MAX_FILE_BYTES
            ) as writer:
                writer.write(rows)
    predictions = tables["predictions"]
    ran = batch.filter(batch["engine"].is_valid())
    compute: list[Any] = [None, None, None, 0]
    if ran.num_rows:
        counted = ran.group_by(["engine", "precision", "channels_last"]).aggregate(
            [("image_id", "count")]
        )
        top = counted.sort_by([("image_id_count", "descending")]).slice(0, 1).to_pylist()[0]
        compute = [top["engine"], top["precision"], top["channels_last"], top["image_id_count"]]
    label_bytes = pc.sum(pc.binary_length(predictions["label_map"])).as_py() or 0
    return pa.table(
        [
            [predictions.num_rows],
            [tables["errors"].num_rows],
            [tables["class_metrics"].num_rows],
            [label_bytes],
            *([value] for value in compute),
            [strips],
        ],
        schema=WRITTEN,
    )


def split_rows(batch: pa.Table, class_names: Sequence[str], model: str) -> dict[str, pa.Table]:
    """One batch of actor output as ``predictions``, ``class_metrics`` and ``errors`` rows.

    Args:
        batch: Rows of :data:`pipeline.segment.actor.SEGMENT_OUTPUT`.
        class_names: Name per class id.
        model: The model URI of the predictions.
    """
    failed = batch["stage"].is_valid()
    errors = batch.filter(failed).select(_ERROR_COLUMNS)
    good = batch.filter(pc.invert(failed))
    predictions = good.select(_PREDICTION_COLUMNS).append_column(
        "model_uri", pa.array([model] * good.num_rows, pa.string())
    )
    return {
        "predictions": predictions,
        "class_metrics": _class_metrics(good.filter(good["gt_pixels"].is_valid()), class_names),
        "errors": errors,
    }


def _class_metrics(scored: pa.Table, class_names: Sequence[str]) -> pa.Table:
    """Per image, a row per class present in its ground truth or prediction (vectorized)."""
    n = len(class_names)
    if not scored.num_rows:
        return pa.table({name: [] for name in _METRIC_COLUMNS})
    counts = {
        name: pc.list_flatten(scored[name]).to_numpy().reshape(scored.num_rows, n)
        for name in COUNTS
    }
    present = (counts["gt_pixels"] > 0) | (counts["pred_pixels"] > 0)
    image_index, class_id = np.nonzero(present)
    union = counts["union"][present]
    inter = counts["intersection"][present]
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    ids = pc.take(scored["image_id"], pa.array(image_index))
    return pa.table(
        {
            "image_id": ids,
            "class_id": pa.array(class_id, pa.int32()),
            "class_name": pc.take(pa.array(list(class_names), pa.string()), pa.array(class_id)),
            **{name: pa.array(counts[name][present], pa.int64()) for name in COUNTS},
            "iou": pa.array(iou, pa.float64(), from_pandas=True),
        }
    )


def strip_rows(written: pa.Table) -> list[pa.Table]:
    """The strip rows that :func:`write_batch` passed on, as tables of actor output."""
    return [
        pa.ipc.open_stream(data).read_all()
        for data in written["strip_rows"].to_pylist()
        if data is not None
    ]
