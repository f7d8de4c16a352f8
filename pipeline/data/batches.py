"""Decoded rows as arrays and tensors: samples for inference and validation, shuffled and
collated batches for training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import ray.data
    import torch

from ray.data.collate_fn import ArrowBatchCollateFn

from pipeline.data.reading import SHUFFLE_MODES, ShuffleMode

__all__ = [
    "Sample",
    "TrainBatch",
    "TrainCollate",
    "iter_samples",
    "iter_train_batches",
    "samples_from_batch",
    "shuffle_each_epoch",
]


def shuffle_each_epoch(dataset: ray.data.Dataset, mode: ShuffleMode = "rows") -> ray.data.Dataset:
    """Add per-epoch shuffling to a training dataset (driver side, before the trainer).

    Ray Train re-executes a dataset for each epoch (each pass over a worker's
    ``get_dataset_shard`` iterator), and an unseeded shuffle draws a new seed per
    execution, so every epoch has a new order and a new row-to-worker assignment.
    ``"rows"``: a full ``random_shuffle`` (an all-to-all exchange); ``"blocks"``:
    ``randomize_block_order`` only (cheap; pair it with ``local_shuffle_buffer_size`` in
    :func:`iter_train_batches`); ``"none"``.

    Note: Ray Train's default ``DataConfig`` splits with ``streaming_split(equal=True)``,
    which gives every worker the same number of rows and so drops up to
    ``num_workers - 1`` rows per epoch (a different few each epoch when shuffled).

    Args:
        dataset: Good rows (:func:`good_rows`).
        mode: ``"rows"``, ``"blocks"`` or ``"none"``.
    """
    if mode == "rows":
        return dataset.random_shuffle()
    if mode == "blocks":
        return dataset.randomize_block_order()
    if mode == "none":
        return dataset
    raise ValueError(f"mode must be one of {SHUFFLE_MODES}, got {mode!r}")


@dataclass(frozen=True)
class TrainBatch:
    """A training batch: transformed crops, their masks and ids."""

    images: torch.Tensor
    """float32 (N, 3, h, w), normalized."""
    masks: torch.Tensor
    """int64 (N, h, w) class ids (255 = ignore)."""
    image_ids: tuple[str, ...]
    """The N image ids, in batch order."""


class TrainCollate(ArrowBatchCollateFn):
    """Turn a batch of decoded rows into a :class:`TrainBatch` with a paired transform.

    Runs in the Train worker (in the iterator's prefetch threads). Feed it
    :func:`good_rows` only: dropping error rows here would give ranks different numbers of
    steps, and DDP would hang at the next all-reduce, so an error row raises instead.

    Args:
        transform: ``(image, mask) -> (float (3, h, w), int64 (h, w))``, e.g.
            ``fcn.transforms.train_transform(crop_size)``; its outputs must share one size.
    """

    def __init__(self, transform: Callable[[np.ndarray, np.ndarray], Any]) -> None:
        super().__init__()
        self.transform = transform

    def __call__(self, batch: pa.Table) -> TrainBatch:  # type: ignore[override]
        """Transform and stack one batch of good rows."""
        import torch

        if "error_stage" in batch.column_names and batch["error_stage"].null_count < len(batch):
            raise RuntimeError("training batches must hold good rows only: use good_rows()")
        images, masks, ids = [], [], []
        for sample in samples_from_batch(batch):
            if sample.mask is None:
                raise RuntimeError(
                    f"{sample.image_uri}: training needs masks; read with require_masks=True"
                )
            image, mask = self.transform(sample.image, sample.mask)
            images.append(image)
            masks.append(mask)
            ids.append(sample.image_id)
        if not ids:
            raise RuntimeError("an empty training batch")
        sizes = {tuple(t.shape) for t in images}
        if len(sizes) != 1:
            raise RuntimeError(
                f"transformed images differ in size {sorted(sizes)}; use a cropping transform"
            )
        return TrainBatch(
            images=torch.stack(images), masks=torch.stack(masks), image_ids=tuple(ids)
        )


def iter_train_batches(
    shard: ray.data.DataIterator,
    *,
    transform: Callable[[np.ndarray, np.ndarray], Any],
    batch_size: int,
    local_shuffle_buffer_size: int | None = None,
    drop_last: bool = False,
    prefetch_batches: int = 1,
    device: torch.device | str | None = None,
) -> Iterator[TrainBatch]:
    """Batches for one epoch of a Ray Train worker's shard, transformed on the worker.

    Call once per epoch with ``ray.train.get_dataset_shard("train")``: each call is a new
    pass (a new execution of the dataset, so a new shuffle, see :func:`shuffle_each_epoch`).

    Args:
        shard: The worker's dataset iterator.
        transform: Paired train transform, e.g. ``fcn.transforms.train_transform(crop)``.
        batch_size: Rows per batch (error rows, if any, are dropped from their batch).
        local_shuffle_buffer_size: Rows in a worker-local shuffle buffer (>= batch_size);
            None: no local shuffling.
        drop_last: Drop a last, incomplete batch.
        prefetch_batches: Batches fetched and transformed ahead, in background threads.
        device: Move tensors here (e.g. ``ray.train.torch.get_device()``); None keeps CPU.
    """
    batches = shard.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=TrainCollate(transform),
        local_shuffle_buffer_size=local_shuffle_buffer_size,
        drop_last=drop_last,
        prefetch_batches=prefetch_batches,
    )
    for batch in batches:
        if not isinstance(batch, TrainBatch):  # pragma: no cover - Ray contract
            raise TypeError(f"expected a TrainBatch from the collate step, got {type(batch)}")
        if device is not None:
            batch = TrainBatch(
                images=batch.images.to(device, non_blocking=True),
                masks=batch.masks.to(device, non_blocking=True),
                image_ids=batch.image_ids,
            )
        yield batch


@dataclass(frozen=True)
class Sample:
    """One decoded image, at its own size."""

    image_id: str
    """Its id in the manifest."""
    image_uri: str
    """Where the image was read from."""
    mask_uri: str | None
    """Where the mask was read from, or None."""
    split: str | None
    """Its split, or None."""
    image: np.ndarray
    """uint8 (H, W, 3) RGB (read-only view)."""
    mask: np.ndarray | None
    """uint8 (H, W) class ids, or None (read-only view)."""


def samples_from_batch(batch: pa.Table | Mapping[str, Any]) -> list[Sample]:
    """The good rows of a decoded batch as :class:`Sample` s (error rows are skipped).

    Args:
        batch: Decoded rows, as a ``pyarrow.Table`` or a dict of columns (numpy or lists).
    """
    if isinstance(batch, pa.Table):
        columns = {name: batch[name].to_pylist() for name in batch.column_names}
    else:
        columns = {name: list(values) for name, values in batch.items()}
    num_rows = len(columns["image_id"])
    errors = columns.get("error_stage", [None] * num_rows)
    samples = []
    for i in range(num_rows):
        if errors[i] is not None:
            continue
        h, w = int(columns["height"][i]), int(columns["width"][i])
        mask_bytes = columns["mask"][i]
        samples.append(
            Sample(
                image_id=str(columns["image_id"][i]),
                image_uri=str(columns["image_uri"][i]),
                mask_uri=columns["mask_uri"][i],
                split=columns["split"][i],
                image=np.frombuffer(columns["image"][i], dtype=np.uint8).reshape(h, w, 3),
                mask=None
                if mask_bytes is None
                else np.frombuffer(mask_bytes, dtype=np.uint8).reshape(h, w),
            )
        )
    return samples


def iter_samples(
    source: ray.data.Dataset | ray.data.DataIterator, *, batch_size: int = 16
) -> Iterator[Sample]:
    """Every good decoded image of a dataset, each at its own size (error rows skipped).

    Args:
        source: A decoded dataset (:func:`read_decoded` or :func:`good_rows`) or its iterator.
        batch_size: Rows fetched at a time.
    """
    for batch in source.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
        yield from samples_from_batch(batch)
