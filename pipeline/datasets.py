"""Datasets: layouts, manifests, the synthetic writer, and Ray Data reading with error rows.

Three layouts under a root URI (any URI :mod:`pipeline.storage` resolves):

- ``voc``: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNGs whose
  indices are class ids), ``ImageSets/Segmentation/<split>.txt`` (one id per line);
- ``generic``: ``images/<id>.<ext>`` and ``masks/<id>.png`` matched by path without suffix,
  optional ``splits/<split>.txt``;
- ``images``: image files at any depth, no masks (inference); the id is the path relative
  to the root without its suffix (with it, where two files would share an id).

``classes.txt`` at the root names the classes (one per line, index = class id); a VOC root
without one has the 21 VOC classes.

A manifest is a Parquet table, one row per sample (:data:`MANIFEST_SCHEMA`), with the
root, layout, class names and split sizes in its schema metadata. Build it once for a large
bucket (:func:`build_manifest`, :func:`write_manifest`); jobs take a root or a ``.parquet``
manifest URI alike (:func:`load_manifest`).

Reading (:func:`read_decoded`, :func:`read_dataset`): the manifest becomes a Ray Dataset
(``from_blocks``), and one ``map_batches`` step reads each row's objects through
:mod:`pipeline.storage` and decodes them with the bounded decoder of
:mod:`pipeline.decode`. Every input row comes out as exactly one output row, either good
(pixels filled, ``error_stage`` null) or an error (pixels null, ``error_stage`` /
``error_type`` / ``error_message`` set); see :func:`read_dataset` for splitting the two.
Pixels travel as raw bytes (``image``: H*W*3 RGB, ``mask``: H*W class ids) with ``height``
and ``width``; :func:`samples_from_batch` and :func:`iter_train_batches` turn them back into
arrays and tensors.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import posixpath
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from ray.data.collate_fn import ArrowBatchCollateFn

from pipeline.decode import (
    DEFAULT_FORMATS,
    DEFAULT_MAX_PIXELS,
    DecodeError,
    Stage,
    check_formats,
    check_max_pixels,
    decode_image,
    decode_mask,
)
from pipeline.storage import (
    FileInfo,
    Location,
    ObjectTooLarge,
    StorageError,
    StorageOptions,
    exists,
    list_files,
    read_bytes,
    resolve,
    write_bytes,
)

if TYPE_CHECKING:
    import ray.data
    import torch

__all__ = [
    "DECODED_SCHEMA",
    "ERRORS_SCHEMA",
    "IMAGE_SUFFIXES",
    "MANIFEST_SCHEMA",
    "DatasetConfig",
    "DatasetError",
    "DatasetInfo",
    "Layout",
    "LayoutChoice",
    "ManifestMeta",
    "Sample",
    "ShuffleMode",
    "TrainBatch",
    "TrainCollate",
    "bench_read",
    "build_manifest",
    "dataset_info",
    "detect_layout",
    "error_rows",
    "format_bench",
    "good_rows",
    "group_by_size",
    "iter_samples",
    "iter_train_batches",
    "load_batch",
    "load_manifest",
    "manifest_hash",
    "manifest_meta",
    "read_dataset",
    "read_decoded",
    "read_manifest",
    "samples_from_batch",
    "shuffle_each_epoch",
    "write_manifest",
    "write_synthetic",
]

Layout = Literal["voc", "generic", "images"]
"""A dataset layout (see the module docstring)."""

LayoutChoice = Literal["auto", "voc", "generic", "images"]
"""A layout, or ``"auto"`` to detect it (:func:`detect_layout`)."""

ShuffleMode = Literal["rows", "blocks", "none"]
"""Per-epoch shuffling for training (see :func:`shuffle_each_epoch`)."""

IMAGE_SUFFIXES: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
)
"""File suffixes listed as images (case-insensitive)."""

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("mask_uri", pa.string()),
        pa.field("split", pa.string()),
        pa.field("bytes", pa.int64()),
    ]
)
"""One row per sample. ``mask_uri`` is null without a mask, ``split`` null outside any split
file, ``bytes`` (the image's size) null where a split file names an id without an image."""

DECODED_SCHEMA = pa.schema(
    [
        *MANIFEST_SCHEMA,
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("image", pa.large_binary()),
        pa.field("mask", pa.large_binary()),
        pa.field("bytes_read", pa.int64()),
        pa.field("error_stage", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
    ]
)
"""Rows out of :func:`load_batch`: the manifest columns, then ``image`` (H*W*3 RGB bytes) and
``mask`` (H*W class-id bytes, null without a mask) of good rows, or the ``error_*`` columns of
error rows (exactly one of the two is set)."""

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("image_uri", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("message", pa.string()),
    ]
)
"""Rows of the errors stream (:func:`error_rows`), as in the ``errors`` result table."""

_ERROR_COLUMNS = ("error_stage", "error_type", "error_message")
_GOOD_COLUMNS = tuple(n for n in DECODED_SCHEMA.names if n not in _ERROR_COLUMNS)
_META_KEY = b"fcnpipe.manifest"
_LIST_THREADS = 8
_SPLIT_PREFERENCE = ("train", "val", "test")


class DatasetError(ValueError):
    """A dataset root or manifest that cannot be used as asked (the message says why)."""


@dataclass(frozen=True, kw_only=True)
class ManifestMeta:
    """What a manifest records besides its rows (kept in its Parquet schema metadata)."""

    root: str | None
    """The dataset root it was built from."""
    layout: Layout | None
    """The layout of that root."""
    class_names: tuple[str, ...] | None
    """Class names (index = class id), or None where the dataset names none."""
    splits: Mapping[str, int]
    """Number of ids in each split file."""


@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    """A summary of a dataset root or manifest."""

    uri: str
    """The root or manifest URI."""
    layout: Layout | None
    """Its layout (None for a manifest without metadata)."""
    num_images: int
    """Images that exist."""
    num_with_masks: int
    """Images that exist and have a mask."""
    num_missing: int
    """Ids named by a split file without an image."""
    splits: Mapping[str, int]
    """Ids per split file (a VOC ``trainval`` overlaps ``train`` and ``val``)."""
    class_names: tuple[str, ...] | None
    """Class names, or None where the dataset names none."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "uri": self.uri,
            "layout": self.layout,
            "num_images": self.num_images,
            "num_with_masks": self.num_with_masks,
            "num_missing": self.num_missing,
            "splits": dict(self.splits),
            "class_names": None if self.class_names is None else list(self.class_names),
        }


@dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    """How a job finds, reads and decodes its dataset; travels into Ray tasks as it is."""

    # Read from JSON (flow parameters, Ray Jobs) by pydantic: an unknown field is an error,
    # not silently dropped. A plain dict, so this module needs no pydantic import.
    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}

    layout: LayoutChoice = "auto"
    """Layout of a dataset root; ``"auto"`` detects it. Ignored for a manifest."""
    split: str | None = None
    """Split to read (e.g. ``"train"``); None reads every image."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Largest width * height decoded; larger images become error rows."""
    max_bytes: int = 256 * 2**20
    """Largest object read (bytes); larger ones become error rows."""
    formats: tuple[str, ...] = DEFAULT_FORMATS
    """Image formats decoded (Pillow names); others become error rows."""
    num_classes: int | None = None
    """Mask values must be below this (or 255); None: the dataset's class count, if known."""
    require_masks: bool = False
    """An image without a mask is an error row (training); else its mask is null."""
    batch_size: int = 16
    """Rows per decode batch (one Ray task call)."""
    rows_per_block: int = 32
    """Manifest rows per input block: the unit Ray Data schedules, so the parallelism."""
    read_threads: int = 16
    """Objects fetched concurrently within a decode task (object-store latency)."""
    num_cpus: float = 1.0
    """CPUs reserved per decode task."""
    storage: StorageOptions = field(default_factory=StorageOptions)
    """How to reach object storage."""

    def __post_init__(self) -> None:
        if self.layout not in get_args(LayoutChoice):
            raise ValueError(f"layout must be one of {get_args(LayoutChoice)}, got {self.layout!r}")
        if self.split is not None and not _is_safe_name(self.split):
            raise ValueError(f"split must be a plain name like 'train', got {self.split!r}")
        check_max_pixels(self.max_pixels)
        object.__setattr__(self, "formats", check_formats(self.formats))
        if self.num_classes is not None and not 1 <= self.num_classes <= 255:
            raise ValueError(f"num_classes must be in [1, 255] (255 = ignore): {self.num_classes}")
        for name in ("max_bytes", "batch_size", "rows_per_block", "read_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_cpus <= 0:
            raise ValueError(f"num_cpus must be > 0, got {self.num_cpus}")


# ----------------------------------------------------------------------------- layouts


def detect_layout(uri: str | Location, options: StorageOptions | None = None) -> Layout:
    """The layout of a dataset root: ``voc`` with ``JPEGImages/``, ``generic`` with
    ``images/``, else ``images``.

    Args:
        uri: The dataset root.
        options: Storage options.
    """
    root = resolve(uri, options)
    with ThreadPoolExecutor(2) as pool:
        voc = pool.submit(exists, root.join("JPEGImages"))
        generic = pool.submit(exists, root.join("images"))
        if voc.result():
            return "voc"
        return "generic" if generic.result() else "images"


def write_synthetic(
    uri: str | Location,
    *,
    num_images: int,
    size: int | tuple[int, int] = 128,
    seed: int = 0,
    val_fraction: float = 0.2,
    options: StorageOptions | None = None,
    max_workers: int = 8,
) -> DatasetInfo:
    """Write the synthetic shapes dataset (:mod:`fcn.synthetic`) in VOC layout.

    JPEG images (quality 95, 4:4:4 chroma), palette PNG masks, ``classes.txt`` and, last,
    ``ImageSets/Segmentation/{train,val}.txt``. Same arguments, same bytes; objects of an
    earlier, larger dataset at the same root are left in place.

    Args:
        uri: Dataset root.
        num_images: Number of images.
        size: Image size, int or (height, width).
        seed: Dataset seed.
        val_fraction: Fraction of images in ``val``.
        options: Storage options.
        max_workers: Threads generating and writing samples (object-store latency).
    """
    # Imported here: decode tasks unpickle this module and need neither (nor torch).
    from fcn.palette import encode_label_png
    from fcn.synthetic import CLASS_NAMES, make_dataset

    data = make_dataset(num_images, size=size, seed=seed, val_fraction=val_fraction)
    root = resolve(uri, options)

    def write_one(index: int) -> None:
        sample = data[index]
        buf = io.BytesIO()
        # 4:4:4 chroma: thin strokes are told apart by colour.
        Image.fromarray(sample.image).save(buf, format="JPEG", quality=95, subsampling=0)
        write_bytes(root.join("JPEGImages", f"{sample.image_id}.jpg"), buf.getvalue())
        mask_png = encode_label_png(sample.mask, palette=True)
        write_bytes(root.join("SegmentationClass", f"{sample.image_id}.png"), mask_png)

    with ThreadPoolExecutor(max(1, max_workers)) as pool:
        list(pool.map(write_one, range(num_images)))
    write_bytes(root.join("classes.txt"), "".join(f"{n}\n" for n in CLASS_NAMES).encode())
    splits: dict[str, int] = {}
    for split in ("train", "val"):
        ids = data.ids(split)
        splits[split] = len(ids)
        text = "".join(f"{i}\n" for i in ids)
        write_bytes(root.join("ImageSets", "Segmentation", f"{split}.txt"), text.encode())
    return DatasetInfo(
        uri=root.uri,
        layout="voc",
        num_images=num_images,
        num_with_masks=num_images,
        num_missing=0,
        splits=splits,
        class_names=CLASS_NAMES,
    )


# ----------------------------------------------------------------------------- manifests


def build_manifest(
    uri: str | Location,
    *,
    layout: LayoutChoice = "auto",
    split: str | None = None,
    options: StorageOptions | None = None,
) -> pa.Table:
    """List a dataset root into a manifest (:data:`MANIFEST_SCHEMA`, metadata included).

    The layout's directories are listed concurrently. With ``split``, the rows are the ids of
    that split file in its order; without, every image sorted by id (each labelled with the
    smallest split file naming it, so ``train`` rather than ``trainval``), then the ids that
    split files name without an image. Such ids, and ids with ``..`` in them, stay rows:
    reading them gives error rows.

    Args:
        uri: The dataset root.
        layout: The layout, or ``"auto"``.
        split: A split name, or None.
        options: Storage options.

    Raises:
        DatasetError: No images under the root, an unknown split, ambiguous ids, or a bad
            ``classes.txt`` (the message names the URI).
    """
    root = resolve(uri, options)
    if split is not None and not _is_safe_name(split):
        raise DatasetError(f"split must be a plain name like 'train', got {split!r}")
    kind = detect_layout(root) if layout == "auto" else layout
    if kind not in get_args(Layout):
        raise ValueError(f"layout must be one of {get_args(LayoutChoice)}, got {layout!r}")
    if kind == "images":
        if split is not None:
            raise DatasetError(
                f"{root.uri}: an images-only dataset has no splits (asked {split!r})"
            )
        splits: dict[str, int] = {}
        rows, classes = _images_rows(root), None
    else:
        rows, classes, splits = _paired_rows(root, kind, split)
    if not rows:
        raise DatasetError(f"no images found under {root.uri} (layout {kind})")
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    meta = ManifestMeta(root=root.uri, layout=kind, class_names=classes, splits=splits)
    return _with_meta(table, meta)


def write_manifest(
    table: pa.Table, uri: str | Location, options: StorageOptions | None = None
) -> None:
    """Write a manifest as one Parquet object (zstd), atomically.

    Args:
        table: A manifest (:data:`MANIFEST_SCHEMA`; its metadata is kept).
        uri: Where to write, usually ending in ``.parquet``.
        options: Storage options.
    """
    table = _check_manifest(table, str(uri))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(resolve(uri, options), buf.getvalue())


def read_manifest(uri: str | Location, options: StorageOptions | None = None) -> pa.Table:
    """Read a manifest written by :func:`write_manifest` (or any Parquet file with its columns).

    Args:
        uri: The manifest's URI.
        options: Storage options.

    Raises:
        DatasetError: Not Parquet, or columns missing.
        FileNotFoundError: No such object.
    """
    data = read_bytes(resolve(uri, options))
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"{uri}: not a Parquet manifest: {exc}") from exc
    return _check_manifest(table, str(uri))


def load_manifest(
    uri_or_manifest: str | Location,
    split: str | None = None,
    *,
    layout: LayoutChoice = "auto",
    options: StorageOptions | None = None,
) -> pa.Table:
    """The manifest of a job's input: read a ``.parquet`` manifest, or list a dataset root.

    Args:
        uri_or_manifest: A dataset root, or a manifest URI ending in ``.parquet``.
        split: Keep this split only (a manifest keeps rows whose ``split`` equals it).
        layout: Layout of a dataset root.
        options: Storage options.

    Raises:
        DatasetError: Nothing to read (the message names the URI).
    """
    uri = str(uri_or_manifest)
    if not uri.lower().endswith(".parquet"):
        return build_manifest(uri_or_manifest, layout=layout, split=split, options=options)
    table = read_manifest(uri_or_manifest, options)
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    if table.num_rows == 0:
        where = f" in split {split!r}" if split is not None else ""
        raise DatasetError(f"no images found in manifest {uri}{where}")
    return table


def manifest_meta(table: pa.Table) -> ManifestMeta:
    """The metadata of a manifest (all None/empty for a plain Parquet table).

    Args:
        table: A manifest.
    """
    raw = (table.schema.metadata or {}).get(_META_KEY)
    if raw is None:
        return ManifestMeta(root=None, layout=None, class_names=None, splits={})
    meta = json.loads(raw)
    names = meta.get("class_names")
    return ManifestMeta(
        root=meta.get("root"),
        layout=meta.get("layout"),
        class_names=None if names is None else tuple(names),
        splits={str(k): int(v) for k, v in (meta.get("splits") or {}).items()},
    )


def manifest_hash(table: pa.Table) -> str:
    """A SHA-256 of a manifest's rows (ids, URIs, splits, sizes; order-independent).

    Args:
        table: A manifest.
    """
    digest = hashlib.sha256()
    columns = [table[name].to_pylist() for name in MANIFEST_SCHEMA.names]
    for row in sorted(zip(*columns, strict=True), key=lambda r: (r[0], r[1])):
        digest.update(json.dumps(row).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def dataset_info(
    uri: str | Location,
    *,
    layout: LayoutChoice = "auto",
    options: StorageOptions | None = None,
) -> DatasetInfo:
    """Summarise a dataset root or a ``.parquet`` manifest.

    Args:
        uri: The root or manifest URI.
        layout: Layout of a root.
        options: Storage options.

    Raises:
        DatasetError: No images found.
    """
    table = load_manifest(uri, layout=layout, options=options)
    meta = manifest_meta(table)
    # In a manifest built here a null size means "named by a split file, no image"; a
    # hand-made manifest may simply not know sizes.
    present = (
        pc.is_valid(table["bytes"]) if meta.root is not None else pc.is_valid(table["image_uri"])
    )
    has_mask = pc.and_(present, pc.is_valid(table["mask_uri"]))
    num_images = pc.sum(present.cast(pa.int64())).as_py() or 0
    return DatasetInfo(
        uri=str(uri),
        layout=meta.layout,
        num_images=num_images,
        num_with_masks=pc.sum(has_mask.cast(pa.int64())).as_py() or 0,
        num_missing=table.num_rows - num_images,
        splits=meta.splits,
        class_names=meta.class_names,
    )


# ----------------------------------------------------------------------------- reading


def load_batch(
    batch: pa.Table, *, config: DatasetConfig, num_classes: int | None = None
) -> pa.Table:
    """Read and decode manifest rows: one output row per input row, good or error.

    The ``map_batches`` step of :func:`read_decoded`; plain Python, no Ray needed. A bad
    object (missing, too large, not an image, too many pixels, truncated, wrong or missing
    mask, a ``..`` key) becomes an error row; only :class:`~pipeline.storage.StorageError`
    (missing bucket, bad credentials, storage down) propagates and fails the job.

    Args:
        batch: Manifest rows (:data:`MANIFEST_SCHEMA` columns).
        config: Limits, formats and storage options.
        num_classes: Mask values must be below this or 255; None skips the check.

    Returns:
        A table of :data:`DECODED_SCHEMA`, rows in input order.
    """
    out: dict[str, list[Any]] = {name: [] for name in DECODED_SCHEMA.names}
    rows = batch.select(list(MANIFEST_SCHEMA.names)).to_pylist()
    # Object-store reads are latency-bound: fetch the batch's objects concurrently, decode
    # one by one (bounding decoded memory to one image at a time).
    with ThreadPoolExecutor(min(config.read_threads, 2 * len(rows) or 1)) as pool:
        images = [pool.submit(_read_object, r["image_uri"], config, r["bytes"]) for r in rows]
        masks = [
            None if r["mask_uri"] is None else pool.submit(_read_object, r["mask_uri"], config)
            for r in rows
        ]
    for row, image_read, mask_read in zip(rows, images, masks, strict=True):
        for name in MANIFEST_SCHEMA.names:
            out[name].append(row[name])
        height = width = image = mask = bytes_read = None
        error: tuple[str | None, str | None, str | None] = (None, None, None)
        stage: Stage = "read"
        try:
            data = image_read.result()
            bytes_read = len(data)
            stage = "decode_image"
            pixels = decode_image(data, max_pixels=config.max_pixels, formats=config.formats)
            height, width = int(pixels.shape[0]), int(pixels.shape[1])
            if mask_read is not None:
                stage = "read"
                mask_data = mask_read.result()
                bytes_read += len(mask_data)
                stage = "decode_mask"
                labels = decode_mask(mask_data, height=height, width=width, num_classes=num_classes)
                mask = labels.tobytes()
            elif config.require_masks:
                raise DecodeError("read", "MissingMask", f"no mask for image {row['image_id']!r}")
            image = pixels.tobytes()
        except DecodeError as exc:
            height = width = image = mask = None
            error = (exc.stage, exc.error_type, exc.message)
        except StorageError:
            raise
        except Exception as exc:  # a decoder bug must not take the good images with it
            height = width = image = mask = None
            error = (stage, type(exc).__name__, f"{row['image_uri']}: unexpected error: {exc}")
        for name, value in zip(
            ("height", "width", "image", "mask", "bytes_read", *_ERROR_COLUMNS),
            (height, width, image, mask, bytes_read, *error),
            strict=True,
        ):
            out[name].append(value)
    return pa.table(out, schema=DECODED_SCHEMA)


def read_decoded(
    manifest_or_uri: str | Location | pa.Table,
    *,
    split: str | None = None,
    config: DatasetConfig | None = None,
) -> ray.data.Dataset:
    """A lazy Ray Dataset of decoded rows (:data:`DECODED_SCHEMA`): good rows and error rows.

    One pass over it sees every input row exactly once, as one or the other; consume it
    once (e.g. an inference job writing predictions and errors from the same pass), or
    split it with :func:`good_rows` / :func:`error_rows`.

    Args:
        manifest_or_uri: A manifest table, a ``.parquet`` manifest URI, or a dataset root.
        split: Split to read; None: ``config.split``.
        config: Reading options; defaults to :class:`DatasetConfig()`.
    """
    import ray.data

    # Pin the endpoint and region the driver sees: on a cluster, workers' environments may
    # differ, and they must read from the store the driver listed (neither is a secret).
    cfg = config or DatasetConfig()
    cfg = replace(cfg, storage=cfg.storage.with_environment())
    wanted = split if split is not None else cfg.split
    if isinstance(manifest_or_uri, pa.Table):
        table = _check_manifest(manifest_or_uri, "manifest table")
        if wanted is not None:
            table = table.filter(pc.equal(table["split"], wanted))
        if table.num_rows == 0:
            raise DatasetError(f"no images in the manifest table for split {wanted!r}")
    else:
        table = load_manifest(manifest_or_uri, wanted, layout=cfg.layout, options=cfg.storage)
    meta = manifest_meta(table)
    num_classes = cfg.num_classes
    if num_classes is None and meta.class_names is not None:
        num_classes = len(meta.class_names)
    rows = table.select(list(MANIFEST_SCHEMA.names)).replace_schema_metadata(None)
    step = cfg.rows_per_block
    blocks = [rows.slice(i, step) for i in range(0, rows.num_rows, step)]
    # from_blocks computes block metadata here; from_arrow runs one Ray task per block for it.
    return ray.data.from_blocks(blocks).map_batches(
        functools.partial(load_batch, config=cfg, num_classes=num_classes),
        batch_format="pyarrow",
        batch_size=cfg.batch_size,
        udf_modifying_row_count=False,
        num_cpus=cfg.num_cpus,
    )


def good_rows(decoded: ray.data.Dataset) -> ray.data.Dataset:
    """The good rows of a decoded dataset, without the error columns.

    Args:
        decoded: From :func:`read_decoded`.
    """
    from ray.data.expressions import col

    return decoded.filter(expr=col("error_stage").is_null()).select_columns(list(_GOOD_COLUMNS))


def error_rows(decoded: ray.data.Dataset) -> ray.data.Dataset:
    """The error rows of a decoded dataset, as :data:`ERRORS_SCHEMA` rows.

    Args:
        decoded: From :func:`read_decoded`.
    """
    from ray.data.expressions import col

    return (
        decoded.filter(expr=col("error_stage").is_not_null())
        .select_columns(["image_id", "image_uri", *_ERROR_COLUMNS])
        .rename_columns({"error_stage": "stage", "error_message": "message"})
    )


def read_dataset(
    manifest_or_uri: str | Location | pa.Table,
    *,
    split: str | None = None,
    config: DatasetConfig | None = None,
    cache: bool = False,
) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """Good rows and error rows of a dataset, as two lazy Ray Datasets.

    Both are filters of one :func:`read_decoded` dataset, on a column every row carries, so
    each input row is in exactly one of them. Lazy datasets re-run their pipeline on each
    consumption: consuming both reads and decodes twice, and each training epoch reads
    again. ``cache=True`` decodes once into Ray's object store (spilling to disk when
    full) and keeps both subsets there, so consuming them runs no task at all: an epoch
    without a global shuffle needs no free CPU (on a cluster whose CPUs the training
    workers hold in fragments, e.g. half a CPU free on each of two nodes, a per-epoch task
    needing one CPU would wait forever; ``shuffle_each_epoch(..., "rows")`` still runs
    its shuffle's tasks). Otherwise consume :func:`read_decoded` in one pass.

    Args:
        manifest_or_uri: A manifest table, a ``.parquet`` manifest URI, or a dataset root.
        split: Split to read; None: ``config.split``.
        config: Reading options.
        cache: Materialize the decoded rows once (blocks until decoded).

    Returns:
        (good, errors): rows of :data:`DECODED_SCHEMA` without the error columns, and rows
        of :data:`ERRORS_SCHEMA`.
    """
    decoded = read_decoded(manifest_or_uri, split=split, config=config)
    if cache:
        decoded = decoded.materialize()
        # The decoded blocks are freed when `decoded` goes: only the two subsets stay.
        return good_rows(decoded).materialize(), error_rows(decoded).materialize()
    return good_rows(decoded), error_rows(decoded)


# ----------------------------------------------------------------------------- training


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
    raise ValueError(f"mode must be one of {get_args(ShuffleMode)}, got {mode!r}")


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
            raise DatasetError("training batches must hold good rows only: use good_rows()")
        images, masks, ids = [], [], []
        for sample in samples_from_batch(batch):
            if sample.mask is None:
                raise DatasetError(
                    f"{sample.image_uri}: training needs masks; read with require_masks=True"
                )
            image, mask = self.transform(sample.image, sample.mask)
            images.append(image)
            masks.append(mask)
            ids.append(sample.image_id)
        if not ids:
            raise DatasetError("an empty training batch")
        sizes = {tuple(t.shape) for t in images}
        if len(sizes) != 1:
            raise DatasetError(
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


# ----------------------------------------------------------------------------- inference


@dataclass(frozen=True)
class Sample:
    """One decoded image, at its own size."""

    image_id: str
    """The image id."""
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


def group_by_size(samples: Iterable[Sample], *, max_batch: int) -> list[list[Sample]]:
    """Group samples of equal (H, W), in first-seen order, into batches of at most max_batch.

    Args:
        samples: Samples of any sizes.
        max_batch: Largest group.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    groups: dict[tuple[int, int], list[list[Sample]]] = {}
    for sample in samples:
        key = (sample.image.shape[0], sample.image.shape[1])
        runs = groups.setdefault(key, [[]])
        if len(runs[-1]) == max_batch:
            runs.append([])
        runs[-1].append(sample)
    return [run for runs in groups.values() for run in runs]


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


# ----------------------------------------------------------------------------- benchmark


def bench_read(
    local_uri: str,
    s3_uri: str,
    *,
    num_images: int = 200,
    config: DatasetConfig | None = None,
    warmup: bool = True,
) -> dict[str, Any]:
    """Read and decode the same images from local disk and from S3, and time both.

    Each side is one :func:`read_decoded` pass over the first ``num_images`` ids (sorted)
    that both roots hold, consumed on the driver. With ``warmup``, an untimed pass over each
    side first starts Ray's workers, their storage clients and any caches, so the figures
    are steady-state throughput. Prints nothing.

    Args:
        local_uri: A local dataset root or manifest.
        s3_uri: The same dataset on an object store (root or manifest).
        num_images: Images to read from each.
        config: Reading options (layout, split, limits, storage).
        warmup: Run an untimed pass over each side first.

    Returns:
        ``{"num_images", "local": {...}, "s3": {...}, "s3_over_local"}``; each side has
        ``seconds``, ``images``, ``errors``, ``bytes``, ``images_per_s``, ``mb_per_s``
        (encoded bytes read, images and masks, 10**6 bytes) and ``megapixels_per_s``.
        ``s3_over_local`` is the ratio of their images/s.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    cfg = config or DatasetConfig()
    tables = {
        name: load_manifest(uri, cfg.split, layout=cfg.layout, options=cfg.storage)
        for name, uri in (("local", local_uri), ("s3", s3_uri))
    }
    common = set(tables["local"]["image_id"].to_pylist()) & set(
        tables["s3"]["image_id"].to_pylist()
    )
    ids = sorted(common)[:num_images]
    if not ids:
        raise DatasetError(f"{local_uri} and {s3_uri} have no image ids in common")
    picked = {n: t.filter(pc.is_in(t["image_id"], pa.array(ids))) for n, t in tables.items()}
    if warmup:
        for table in picked.values():
            _consume(read_decoded(table, config=cfg))
    result: dict[str, Any] = {"num_images": len(ids)}
    for name, table in picked.items():
        started = time.perf_counter()
        counts = _consume(read_decoded(table, config=cfg))
        seconds = max(time.perf_counter() - started, 1e-9)
        result[name] = {
            "seconds": seconds,
            **counts,
            "images_per_s": counts["images"] / seconds,
            "mb_per_s": counts["bytes"] / 1e6 / seconds,
            "megapixels_per_s": counts["pixels"] / 1e6 / seconds,
        }
    local_rate = result["local"]["images_per_s"]
    result["s3_over_local"] = result["s3"]["images_per_s"] / local_rate if local_rate else None
    return result


def format_bench(result: Mapping[str, Any]) -> str:
    """A plain-text table of :func:`bench_read` figures.

    Args:
        result: What :func:`bench_read` returned.
    """
    lines = [
        f"read + decode, {result['num_images']} images",
        f"{'source':<8}{'seconds':>10}{'images/s':>12}{'MB/s':>10}{'MP/s':>10}{'errors':>8}",
    ]
    for name in ("local", "s3"):
        r = result[name]
        lines.append(
            f"{name:<8}{r['seconds']:>10.2f}{r['images_per_s']:>12.1f}{r['mb_per_s']:>10.2f}"
            f"{r['megapixels_per_s']:>10.2f}{r['errors']:>8d}"
        )
    ratio = result.get("s3_over_local")
    lines.append("s3 / local images/s: " + ("n/a" if ratio is None else f"{ratio:.2f}"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- internals


def _consume(decoded: ray.data.Dataset) -> dict[str, int]:
    counts = {"images": 0, "errors": 0, "bytes": 0, "pixels": 0}
    for data in decoded.iter_batches(batch_size=None, batch_format="pyarrow"):
        batch = pa.table(data)
        good = pc.is_null(batch["error_stage"])
        counts["images"] += pc.sum(good.cast(pa.int64())).as_py() or 0
        counts["errors"] += batch.num_rows - (pc.sum(good.cast(pa.int64())).as_py() or 0)
        counts["bytes"] += pc.sum(batch["bytes_read"]).as_py() or 0
        area = pc.multiply(batch["height"].cast(pa.int64()), batch["width"].cast(pa.int64()))
        counts["pixels"] += pc.sum(area).as_py() or 0
    return counts


def _is_safe_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def _concat(base: str, rel: str) -> str:
    """Join without normalising: a hostile id stays visible and fails when read."""
    return f"{base.rstrip('/')}/{rel}"


def _stem(relpath: str) -> str:
    return posixpath.splitext(relpath)[0]


def _paired_rows(
    root: Location, layout: Layout, split: str | None
) -> tuple[list[dict[str, Any]], tuple[str, ...] | None, dict[str, int]]:
    """Rows of a VOC or generic root: images and masks matched by id, split files applied."""
    image_dir, mask_dir, split_dir = (
        ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")
        if layout == "voc"
        else ("images", "masks", "splits")
    )
    with ThreadPoolExecutor(_LIST_THREADS) as pool:
        images_f = pool.submit(list_files, root.join(image_dir), IMAGE_SUFFIXES)
        masks_f = pool.submit(list_files, root.join(mask_dir), (".png",))
        splits_f = pool.submit(list_files, root.join(split_dir), (".txt",))
        classes_f = pool.submit(_read_classes, root, layout)
        split_loc = root.join(split_dir)
        split_files = {
            _stem(f.relpath): split_loc.join(f.relpath)
            for f in splits_f.result()
            if "/" not in f.relpath
        }
        wanted = [split] if split is not None else sorted(split_files)
        if split is not None and split not in split_files:
            available = ", ".join(sorted(split_files)) or "none"
            raise DatasetError(
                f"no split {split!r} under {root.join(split_dir).uri} (available: {available})"
            )
        id_lists: dict[str, Future[list[str]]] = {
            name: pool.submit(_read_ids, split_files[name]) for name in wanted
        }
        images = _by_id(images_f.result(), root.join(image_dir).uri)
        masks = _by_id(masks_f.result(), root.join(mask_dir).uri)
        split_ids = {name: f.result() for name, f in id_lists.items()}
        classes = classes_f.result()
    splits = {name: len(ids) for name, ids in split_ids.items()}
    if not images:
        raise DatasetError(f"no images found under {root.join(image_dir).uri} ({layout} layout)")

    def row(image_id: str, split_name: str | None) -> dict[str, Any]:
        info = images.get(image_id)
        image_uri = info.uri if info else _concat(root.join(image_dir).uri, f"{image_id}.jpg")
        mask = masks.get(image_id)
        return {
            "image_id": image_id,
            "image_uri": image_uri,
            "mask_uri": mask.uri if mask else None,
            "split": split_name,
            "bytes": info.size if info else None,
        }

    if split is not None:
        ids = list(dict.fromkeys(split_ids[split]))
        if not ids:
            raise DatasetError(f"no images found: split file {split_files[split].uri} is empty")
        return [row(i, split) for i in ids], classes, splits
    primary: dict[str, str] = {}
    for name in sorted(split_ids, key=lambda n: (len(split_ids[n]), _split_rank(n))):
        for image_id in split_ids[name]:
            primary.setdefault(image_id, name)
    rows = [row(i, primary.get(i)) for i in sorted(images)]
    rows += [row(i, primary[i]) for i in sorted(set(primary) - set(images))]
    return rows, classes, splits


def _split_rank(name: str) -> tuple[int, str]:
    rank = _SPLIT_PREFERENCE.index(name) if name in _SPLIT_PREFERENCE else len(_SPLIT_PREFERENCE)
    return rank, name


def _images_rows(root: Location) -> list[dict[str, Any]]:
    """Rows of an images-only root: every image file, id = relative path without suffix."""
    files = list_files(root, IMAGE_SUFFIXES)
    stems: dict[str, int] = {}
    for f in files:
        stems[_stem(f.relpath)] = stems.get(_stem(f.relpath), 0) + 1
    return [
        {
            "image_id": f.relpath if stems[_stem(f.relpath)] > 1 else _stem(f.relpath),
            "image_uri": f.uri,
            "mask_uri": None,
            "split": None,
            "bytes": f.size,
        }
        for f in files
    ]


def _by_id(files: list[FileInfo], where: str) -> dict[str, FileInfo]:
    found: dict[str, FileInfo] = {}
    clashes: list[str] = []
    for f in files:
        key = _stem(f.relpath)
        if key in found:
            clashes.append(f"{found[key].relpath} / {f.relpath}")
        found[key] = f
    if clashes:
        raise DatasetError(
            f"{where}: files share an id (path without suffix): {'; '.join(clashes[:5])}"
        )
    return found


def _read_ids(loc: Location) -> list[str]:
    """Ids of a split file: the first word of each non-empty line."""
    try:
        text = read_bytes(loc).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{loc.uri}: split file is not UTF-8 text: {exc}") from exc
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def _read_classes(root: Location, layout: Layout) -> tuple[str, ...] | None:
    """``classes.txt`` (one name per line), else the VOC names for a VOC root, else None."""
    loc = root.join("classes.txt")
    try:
        text = read_bytes(loc).decode("utf-8")
    except FileNotFoundError:
        if layout != "voc":
            return None
        from fcn.palette import VOC_CLASSES

        return VOC_CLASSES
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{loc.uri}: not UTF-8 text: {exc}") from exc
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or "" in names or len(names) > 255:
        raise DatasetError(
            f"{loc.uri}: expected 1 to 255 class names, one per line without blank lines "
            f"(line index = class id), got {len(names)} lines"
        )
    return tuple(names)


def _with_meta(table: pa.Table, meta: ManifestMeta) -> pa.Table:
    payload = {
        "version": 1,
        "root": meta.root,
        "layout": meta.layout,
        "class_names": None if meta.class_names is None else list(meta.class_names),
        "splits": dict(meta.splits),
    }
    return table.replace_schema_metadata({_META_KEY: json.dumps(payload).encode()})


def _check_manifest(table: pa.Table, where: str) -> pa.Table:
    """The manifest columns, cast to :data:`MANIFEST_SCHEMA`, metadata kept."""
    missing = [n for n in ("image_id", "image_uri") if n not in table.column_names]
    if missing:
        raise DatasetError(f"{where}: not a manifest, columns {missing} missing")
    n = table.num_rows
    columns = [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(n, f.type)
        for f in MANIFEST_SCHEMA
    ]
    out = pa.Table.from_arrays(columns, schema=MANIFEST_SCHEMA.with_metadata(None))
    return out.replace_schema_metadata(table.schema.metadata)


@functools.lru_cache(maxsize=32)
def _store_root(root_uri: str, options: StorageOptions) -> Location:
    """One resolved root per bucket (or the local filesystem) per process: reused clients."""
    return resolve(root_uri, options)


def _object_location(uri: str, options: StorageOptions) -> Location:
    """The Location of an object, refusing ``..`` components (they escape the dataset)."""
    if "://" in uri and not uri.lower().startswith("file://"):
        scheme, rest = uri.split("://", 1)
        bucket, _, key = rest.partition("/")
        root_uri = f"{scheme}://{bucket}"
    else:
        root_uri, key = "/", uri[len("file://") :] if uri.lower().startswith("file://") else uri
    if ".." in key.split("/"):
        raise DecodeError("read", "UnsafeKey", f"{uri}: a '..' path component is not allowed")
    if root_uri == "/":
        key = os.path.abspath(key)  # manifests hold absolute paths; this is for hand-made ones
    try:
        return _store_root(root_uri, options).join(key.lstrip("/"))
    except ValueError as exc:
        raise DecodeError("read", "BadUri", f"{uri}: {exc}") from exc


def _read_object(uri: str, config: DatasetConfig, known_size: int | None = None) -> bytes:
    """Read one object, bounded by ``config.max_bytes``; missing or unreadable -> DecodeError."""
    limit = config.max_bytes
    if known_size is not None and known_size > limit:
        raise DecodeError("read", "TooLarge", f"{uri}: {known_size} bytes > max_bytes {limit}")
    loc = _object_location(uri, config.storage)
    try:
        # Bounded even where the manifest does not know the size (masks, stale manifests).
        return read_bytes(loc, max_bytes=limit)
    except StorageError:
        raise  # bucket missing, access denied, storage down: stop the job
    except FileNotFoundError:
        raise DecodeError("read", "NotFound", f"{uri}: no such object") from None
    except ObjectTooLarge:
        raise DecodeError("read", "TooLarge", f"{uri}: more than max_bytes {limit} bytes") from None
    except (OSError, ValueError) as exc:
        raise DecodeError("read", type(exc).__name__, f"{uri}: {exc}") from exc
