"""Reading a dataset with Ray Data: bounded decoding, every object one good row or one error row.

The manifest (:mod:`pipeline.data.layouts`) becomes a Ray Dataset (``from_blocks``), and one
``map_batches`` step reads each row's objects through :mod:`pipeline.storage` and decodes
them with the bounded decoder of :mod:`pipeline.data.decode` (:func:`read_decoded`). Every
input row comes out as exactly one output row, either good (pixels filled, ``error_stage``
null) or an error (pixels null, ``error_stage`` / ``error_type`` / ``error_message`` set); see
:func:`read_dataset` for splitting the two. Pixels travel as raw bytes (``image``: H*W*3 RGB,
``mask``: H*W class ids) with ``height`` and ``width``; :mod:`pipeline.data.batches` turns them
back into arrays and tensors.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.decode import (
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
    Location,
    ObjectTooLarge,
    StorageError,
    StorageOptions,
    read_bytes,
    resolve,
)

if TYPE_CHECKING:
    import ray.data

from pipeline.data.layouts import (
    MANIFEST_SCHEMA,
    DatasetError,
    LayoutChoice,
    check_manifest,
    load_manifest,
    manifest_meta,
)
from pipeline.errors import ConfigError
from pipeline.plan import AUTO, Auto

__all__ = [
    "DECODED_SCHEMA",
    "ERRORS_SCHEMA",
    "SHUFFLE_MODES",
    "DatasetConfig",
    "ShuffleMode",
    "error_rows",
    "good_rows",
    "load_batch",
    "read_dataset",
    "read_decoded",
]

ShuffleMode = Literal["rows", "blocks", "none"]
"""Per-epoch shuffling for training (see ``pipeline.data.batches.shuffle_each_epoch``)."""
SHUFFLE_MODES: tuple[str, ...] = get_args(ShuffleMode)

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


@dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    """How a job finds, reads and decodes its dataset; travels into Ray tasks as it is."""

    # Read from JSON (flow parameters, Ray Jobs) by pydantic: an unknown field is an error,
    # not silently dropped. A plain dict, so this module needs no pydantic import.
    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}

    layout: LayoutChoice = "auto"
    """Layout of a dataset root; ``"auto"`` detects it. Ignored for a manifest."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Largest width * height decoded; larger images become error rows."""
    max_scene_pixels: int = 1_000_000_000
    """Largest image decoded whole to be cut into tiles (``tile`` set; JPEG, PNG, untiled
    TIFF: 3 GB of RGB in one read task); tiled TIFFs are read by window instead."""
    max_bytes: int = 256 * 2**20
    """Largest object read (bytes); larger ones become error rows."""
    formats: tuple[str, ...] = field(default=DEFAULT_FORMATS, metadata={"cli": False})
    """Image formats decoded (Pillow names); others become error rows."""
    decode_batch_size: int = 16
    """Rows per decode batch (one Ray task call)."""
    rows_per_block: int = 32
    """Manifest rows per input block: the unit Ray Data schedules, so the parallelism."""
    read_threads: int = 16
    """Objects fetched concurrently within a decode task (object-store latency)."""
    decode_cpus: float | Auto = AUTO
    """CPUs Ray reserves per decode task; auto: 1 for training's reads, a quarter for
    segmentation's (whose model is the bottleneck: :mod:`pipeline.plan`)."""
    storage: StorageOptions = field(default_factory=StorageOptions)
    """How to reach object storage."""

    def __post_init__(self) -> None:
        if self.layout not in get_args(LayoutChoice):
            raise ConfigError(
                f"layout must be one of {', '.join(get_args(LayoutChoice))}, got {self.layout!r}"
            )
        try:
            check_max_pixels(self.max_pixels)
            if self.max_scene_pixels < 1:
                raise ValueError(f"max_scene_pixels must be >= 1, got {self.max_scene_pixels}")
            object.__setattr__(self, "formats", check_formats(self.formats))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for name in ("max_bytes", "decode_batch_size", "rows_per_block", "read_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.decode_cpus != AUTO and self.decode_cpus <= 0:
            raise ConfigError(f"decode_cpus must be > 0, got {self.decode_cpus}")


def load_batch(
    batch: pa.Table,
    *,
    config: DatasetConfig,
    num_classes: int | None = None,
    require_masks: bool = False,
    progress: Any = None,
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
        require_masks: An image without a mask is an error row (training); else its mask is
            null.
        progress: A progress board's actor handle (``pipeline.progress.Board``): the batch's
            rows and errors are counted on it, without waiting.

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
            elif require_masks:
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
    if progress is not None:
        failed = sum(stage is not None for stage in out["error_stage"])
        progress.count.remote(len(rows), failed)
    return pa.table(out, schema=DECODED_SCHEMA)


def read_decoded(
    manifest_or_uri: str | Location | pa.Table,
    *,
    split: str | None = None,
    config: DatasetConfig | None = None,
    num_classes: int | None = None,
    require_masks: bool = False,
    rows_per_block: int | None = None,
    block_bytes: int | None = None,
    progress: Any = None,
) -> ray.data.Dataset:
    """A lazy Ray Dataset of decoded rows (:data:`DECODED_SCHEMA`): good rows and error rows.

    One pass over it sees every input row exactly once, as one or the other; consume it
    once (e.g. an inference job writing predictions and errors from the same pass), or
    split it with :func:`good_rows` / :func:`error_rows`.

    Args:
        manifest_or_uri: A manifest table, a ``.parquet`` manifest URI, or a dataset root.
        split: Split to read; None: every image.
        config: Reading options; defaults to :class:`DatasetConfig()`.
        num_classes: Mask values must be below this (or 255); None: the dataset's class
            count, if it names its classes.
        require_masks: An image without a mask is an error row (training).
        rows_per_block: Rows per block (the unit Ray Data schedules); None: the config's.
        block_bytes: Cut decoded blocks at about this many bytes (Ray Data's
            ``target_max_block_size`` for this dataset; an image larger is a block of its
            own); None: Ray Data's default (128 MiB).
        progress: A progress board's actor handle to count decoded rows on (see
            :func:`load_batch`).
    """

    # Pin the endpoint and region the driver sees: on a cluster, workers' environments may
    # differ, and they must read from the store the driver listed (neither is a secret).
    cfg = config or DatasetConfig()
    cfg = replace(cfg, storage=cfg.storage.with_environment())
    wanted = split
    if isinstance(manifest_or_uri, pa.Table):
        table = check_manifest(manifest_or_uri, "manifest table")
        if wanted is not None:
            table = table.filter(pc.equal(table["split"], wanted))
        if table.num_rows == 0:
            raise DatasetError(f"no images in the manifest table for split {wanted!r}")
    else:
        table = load_manifest(manifest_or_uri, wanted, layout=cfg.layout, options=cfg.storage)
    meta = manifest_meta(table)
    if num_classes is None and meta.class_names is not None:
        num_classes = len(meta.class_names)
    source = manifest_blocks(table, rows_per_block or cfg.rows_per_block, block_bytes)
    return source.map_batches(
        functools.partial(
            load_batch,
            config=cfg,
            num_classes=num_classes,
            require_masks=require_masks,
            progress=progress,
        ),
        batch_format="pyarrow",
        batch_size=cfg.decode_batch_size,
        udf_modifying_row_count=False,
        num_cpus=1.0 if cfg.decode_cpus == AUTO else cfg.decode_cpus,
    )


def manifest_blocks(
    table: pa.Table, rows_per_block: int, block_bytes: int | None = None
) -> ray.data.Dataset:
    """A Ray Dataset of manifest rows in blocks of ``rows_per_block``, the input of a decode
    step (:func:`read_decoded`, or the tiled cut of :mod:`pipeline.segment.tiles`).

    Args:
        table: Manifest rows.
        rows_per_block: Rows per block (the unit Ray Data schedules).
        block_bytes: Cut the blocks of the steps after at about this many bytes (Ray Data's
            ``target_max_block_size`` for this dataset); None: Ray Data's default.
    """
    import ray.data

    rows = table.select(list(MANIFEST_SCHEMA.names)).replace_schema_metadata(None)
    blocks = [rows.slice(i, rows_per_block) for i in range(0, rows.num_rows, rows_per_block)]
    # The dataset keeps a copy of the context current at its creation: the block size set
    # here is this dataset's alone.
    context = ray.data.DataContext.get_current()
    default_block_bytes = context.target_max_block_size
    if block_bytes is not None:
        context.target_max_block_size = block_bytes
    try:
        # from_blocks computes block metadata here; from_arrow runs a Ray task per block for it.
        return ray.data.from_blocks(blocks)
    finally:
        context.target_max_block_size = default_block_bytes


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
    num_classes: int | None = None,
    require_masks: bool = False,
    cache: bool = False,
    progress: Any = None,
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
        split: Split to read; None: every image.
        config: Reading options.
        num_classes: See :func:`read_decoded`.
        require_masks: See :func:`read_decoded`.
        cache: Materialize the decoded rows once (blocks until decoded).
        progress: A progress board's actor handle to count decoded rows on.

    Returns:
        (good, errors): rows of :data:`DECODED_SCHEMA` without the error columns, and rows
        of :data:`ERRORS_SCHEMA`.
    """
    decoded = read_decoded(
        manifest_or_uri,
        split=split,
        config=config,
        num_classes=num_classes,
        require_masks=require_masks,
        progress=progress,
    )
    if cache:
        decoded = decoded.materialize()
        # The decoded blocks are freed when `decoded` goes: only the two subsets stay.
        return good_rows(decoded).materialize(), error_rows(decoded).materialize()
    return good_rows(decoded), error_rows(decoded)


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
