"""The inference actor: the model loaded once, decoded rows in, one prediction or error row out
per input row.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.console import tell
from pipeline.data.batches import Sample, samples_from_batch
from pipeline.faults import Faults
from pipeline.segment.config import SegmentCompute
from pipeline.segment.engines import load_engine
from pipeline.segment.tiles import Tiling
from pipeline.storage import StorageError, StorageOptions

__all__ = ["COUNTS", "SEGMENT_OUTPUT", "ActorPlan", "Segmenter", "group_by_size"]

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
        # How the model ran (engine and precision), on predictions:
        pa.field("engine", pa.string()),
        pa.field("precision", pa.string()),
        pa.field("channels_last", pa.bool_()),
        # A strip of a tiled image (pipeline.segment.tiles): which, of how many (its counts
        # are the strip's own rows'); the driver assembles the image once all are back.
        pa.field("strip", pa.int32()),
        pa.field("strips", pa.int32()),
        # A label map too large for the cell: the TIFF object (label_map is then a preview).
        pa.field("label_map_uri", pa.string()),
        # The input object's version as listed (pipeline.data.layouts.MANIFEST_SCHEMA).
        pa.field("image_version", pa.string()),
    ]
)
"""What a :class:`Segmenter` returns: one row per input row, a prediction or an error."""


COUNTS = ("gt_pixels", "pred_pixels", "intersection", "union")


@dataclass(frozen=True, kw_only=True)
class ActorPlan:
    """What every actor needs, worked out by the driver (pickled into the actors)."""

    model_uri: str
    num_classes: int
    threads: int
    batch_pixels: int
    use_gpu: bool
    resize: int | None
    palette: bool
    write_png: str | None
    storage: StorageOptions
    compute: SegmentCompute = field(default_factory=SegmentCompute)
    tiling: Tiling | None = None
    """Tile and overlap of a tiled run."""
    parts_uri: str | None = None
    """Where a tiled run's strips write their parts (``tiles.label_map_dir(...)/_parts``)."""
    faults: Faults | None = None


def group_by_size(samples: Iterable[Sample], *, max_pixels: int) -> list[list[Sample]]:
    """Group samples of equal (H, W), in first-seen order, into batches of at most
    ``max_pixels`` pixels in all (an image over the budget is a batch of its own).

    The model runs one batch per group: images keep their own size, so only equal sizes
    stack, and the budget bounds the activations a call holds, whatever the image count.

    Args:
        samples: Samples of any sizes.
        max_pixels: The pixel budget of one group.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    groups: dict[tuple[int, int], list[list[Sample]]] = {}
    for sample in samples:
        key = (sample.image.shape[0], sample.image.shape[1])
        runs = groups.setdefault(key, [[]])
        if runs[-1] and (len(runs[-1]) + 1) * key[0] * key[1] > max_pixels:
            runs.append([])
        runs[-1].append(sample)
    return [run for runs in groups.values() for run in runs]


class Segmenter:
    """A Ray Data actor: the model loaded once, decoded rows in, prediction rows out.

    Args:
        plan: What to load and how to run it.
    """

    def __init__(self, plan: ActorPlan) -> None:
        import torch

        torch.set_num_threads(plan.threads)
        self.plan = plan
        self.engine = load_engine(
            plan.model_uri,
            backend=plan.compute.backend,
            compute=plan.compute,
            device=torch.device("cuda" if plan.use_gpu else "cpu"),
            threads=plan.threads,
            resize=plan.resize,
            storage=plan.storage,
        )
        tell(f"segmentation engine: {self.engine.describe()}")
        self.mirror = (
            None if plan.write_png is None else storage.resolve(plan.write_png, plan.storage)
        )
        self.calls = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Segment one batch of decoded rows; errors pass through as error rows."""
        from fcn.metrics import confusion_matrix, per_class_counts
        from fcn.palette import encode_label_png

        faults = self.plan.faults
        if faults is not None and faults.actor_stall_after == self.calls:
            import ray

            node = ray.get_runtime_context().get_node_id()
            faults.stall(f"actor-{os.getpid()}", node_id=node)
        self.calls += 1
        n = self.plan.num_classes
        rows = batch.select(
            ["image_id", "image_uri", "image_version", "error_stage", "error_type", "error_message"]
        )
        out: dict[str, list[Any]] = {name: [None] * batch.num_rows for name in SEGMENT_OUTPUT.names}
        index = {image_id: i for i, image_id in enumerate(rows["image_id"].to_pylist())}
        for i, row in enumerate(rows.to_pylist()):
            out["image_id"][i] = row["image_id"]
            out["image_uri"][i] = row["image_uri"]
            out["image_version"][i] = row["image_version"]
            out["stage"][i] = row["error_stage"]
            out["error_type"][i] = row["error_type"]
            out["message"][i] = row["error_message"]
        if "strip" in batch.column_names and batch["strip"].null_count < batch.num_rows:
            strips = pc.is_valid(batch["strip"])
            for j in np.flatnonzero(strips.to_numpy(zero_copy_only=False)).tolist():
                self._strip(batch.slice(j, 1), out, j)
            batch = batch.filter(pc.invert(strips))
        samples = samples_from_batch(batch)
        for group in group_by_size(samples, max_pixels=self.plan.batch_pixels):
            began = time.perf_counter()
            try:
                images = np.stack([s.image for s in group]).transpose(0, 3, 1, 2)
                labels = self.engine.labels(np.ascontiguousarray(images)).astype(np.uint8)
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
                out["engine"][i] = self.engine.name
                out["precision"][i] = self.engine.precision
                out["channels_last"][i] = self.engine.channels_last
                if sample.mask is not None:
                    counts = per_class_counts(confusion_matrix(label, sample.mask, n))
                    for name in COUNTS:
                        out[name][i] = counts[name].tolist()
                if self.mirror is not None:
                    storage.write_bytes(self.mirror.join(f"{sample.image_id}.png"), png)
        return pa.table(out, schema=SEGMENT_OUTPUT)

    def _strip(self, row: pa.Table, out: dict[str, list[Any]], i: int) -> None:
        """Segment one strip of a tiled image into its parts; its counts into row ``i``."""
        from pipeline.segment.tiles import COUNT_NAMES, segment_strip

        plan = self.plan
        if plan.tiling is None or plan.parts_uri is None:
            raise RuntimeError("a strip row in a run without tiles")
        (r,) = row.to_pylist()
        out["strip"][i], out["strips"][i] = r["strip"], r["strips"]
        if r["error_stage"] is not None:
            return
        height, width = int(r["height"]), int(r["width"])
        pixels = np.frombuffer(r["image"], np.uint8).reshape(-1, width, 3)
        mask = None if r["mask"] is None else np.frombuffer(r["mask"], np.uint8).reshape(-1, width)
        began = time.perf_counter()
        try:
            counts = segment_strip(
                self.engine.scores,
                image_id=r["image_id"],
                pixels=pixels,
                mask=mask,
                height=height,
                width=width,
                strip=r["strip"],
                tiling=plan.tiling,
                num_classes=plan.num_classes,
                parts=storage.resolve(plan.parts_uri, plan.storage),
            )
        except StorageError:
            raise
        except Exception as exc:  # e.g. out of memory: this image fails, not the batch
            out["stage"][i], out["error_type"][i] = "infer", type(exc).__name__
            out["message"][i] = f"{r['image_uri']}: strip {r['strip']}: inference failed: {exc}"
            return
        out["height"][i], out["width"][i] = height, width
        out["latency_ms"][i] = (time.perf_counter() - began) * 1000
        for name in COUNT_NAMES:
            if name in counts:
                out[name][i] = counts[name].tolist()
        out["engine"][i] = self.engine.name
        out["precision"][i] = self.engine.precision
        out["channels_last"][i] = self.engine.channels_last
