"""Result tables: the contract users query (schemas, columns, run ids) and row validation.

Six tables (:data:`TABLES`), each partitioned by ``run_id``: ``predictions``,
``class_metrics``, ``runs``, ``errors``, ``training`` and ``inputs`` (the listing of each
incremental stream run). This module says what their rows are
(:func:`conform` validates and casts them; :func:`runs_row` builds a run's summary row) and
what a run id is. Where the tables live and how a run's rows are written and committed (Apache
Iceberg tables in a catalog, data files written by the workers, one atomic commit per run by
the driver) is :mod:`pipeline.store`.

NaN in the metric columns that the contract defines as null where undefined (:data:`NAN_AS_NULL`:
``iou``, ``class_iou``, ``pixel_acc``, ``mean_acc``, ``mean_iou``, ``fw_iou``,
``val_pixel_acc``, ``val_mean_iou``) is stored as null, so SQL aggregates skip it.

Example::

    rows = conform("errors", [{"run_id": "segment-x", "image_uri": "s3://in/a.jpg",
                               "stage": "read", "error_type": "E", "message": "m"}])
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, TypeAlias, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import ConfigError, InputError

PARTITION_COLUMN = "run_id"
"""The partition column of every table (an identity partition: one partition per run)."""

DEFAULT_MAX_ROWS = 100_000
"""A table writer (``pipeline.store.files.TableWriter``) writes a file once it holds this many
rows."""

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""... or this many bytes of Arrow data (the zstd file is smaller)."""

RunKind = Literal["train", "segment"]
RUN_KINDS: tuple[str, ...] = get_args(RunKind)


def _required(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=False)


_RUN_ID = _required("run_id", pa.string())

PREDICTIONS = pa.schema(
    [
        _RUN_ID,
        _required("image_id", pa.string()),
        _required("image_uri", pa.string()),
        _required("height", pa.int32()),
        _required("width", pa.int32()),
        _required("label_map", pa.binary()),  # PNG: single channel, uint8 class ids
        _required("class_pixel_counts", pa.list_(pa.int64())),  # one per class
        _required("model_uri", pa.string()),
        pa.field("latency_ms", pa.float64()),
        # A tiled image's label map too large for the cell: its TIFF object (label_map then
        # holds a preview, at most 1024 px a side); null when label_map is the whole map.
        pa.field("label_map_uri", pa.string()),
        # The image object's version when it was read (its ETag, else size and modification
        # time: pipeline.storage.FileInfo.version); with image_uri, the key of incremental runs.
        pa.field("image_version", pa.string()),
    ]
)
"""One row per segmented image."""

CLASS_METRICS = pa.schema(
    [
        _RUN_ID,
        _required("image_id", pa.string()),
        _required("class_id", pa.int32()),
        _required("class_name", pa.string()),
        _required("gt_pixels", pa.int64()),
        _required("pred_pixels", pa.int64()),
        _required("intersection", pa.int64()),
        _required("union", pa.int64()),
        pa.field("iou", pa.float64()),  # null where union = 0
    ]
)
"""One row per image x class present in the ground truth or the prediction (with a mask)."""

RUNS = pa.schema(
    [
        _RUN_ID,
        _required("kind", pa.string()),  # "train" or "segment"
        pa.field("input_uri", pa.string()),
        pa.field("model_uri", pa.string()),
        _required("num_images", pa.int64()),
        _required("num_errors", pa.int64()),
        pa.field("pixel_acc", pa.float64()),
        pa.field("mean_acc", pa.float64()),
        pa.field("mean_iou", pa.float64()),
        pa.field("fw_iou", pa.float64()),
        pa.field("class_names", pa.list_(pa.string())),
        pa.field("class_iou", pa.list_(pa.float64())),  # null for classes absent from gt and pred
        _required("started_at", pa.timestamp("us", tz="UTC")),
        _required("finished_at", pa.timestamp("us", tz="UTC")),
        pa.field("images_per_s", pa.float64()),
        pa.field("precision", pa.string()),  # fp32, bf16 or fp16: what the model ran in
        pa.field("channels_last", pa.bool_()),
        pa.field("engine", pa.string()),  # e.g. torch 2.14.1, openvino 2026.4.1
        pa.field("plan", pa.string()),  # how it was sized (pipeline.plan), one line
        pa.field("stream", pa.string()),  # segment --stream NAME: the incremental stream
    ]
)
"""One row per run."""

ERRORS = pa.schema(
    [
        _RUN_ID,
        pa.field("image_id", pa.string()),  # as in pipeline.data.reading.ERRORS_SCHEMA
        _required("image_uri", pa.string()),
        _required("stage", pa.string()),
        _required("error_type", pa.string()),
        _required("message", pa.string()),
        pa.field("image_version", pa.string()),  # as in predictions
    ]
)
"""One row per failed object."""

INPUTS = pa.schema(
    [
        _RUN_ID,
        _required("image_id", pa.string()),
        _required("image_uri", pa.string()),
        _required("image_version", pa.string()),
    ]
)
"""One row per object a stream run (``segment --stream``) listed, segmented or not: which
objects exist at the run's time, so the ``predictions_latest`` view drops deleted ones."""

TRAINING = pa.schema(
    [
        _RUN_ID,
        _required("epoch", pa.int32()),
        pa.field("train_loss", pa.float64()),
        pa.field("val_pixel_acc", pa.float64()),
        pa.field("val_mean_iou", pa.float64()),
        pa.field("lr", pa.float64()),
        pa.field("images_per_s", pa.float64()),
        pa.field("checkpoint_uri", pa.string()),
        pa.field("precision", pa.string()),
    ]
)
"""One row per training epoch."""

TABLES: dict[str, pa.Schema] = {
    "predictions": PREDICTIONS,
    "class_metrics": CLASS_METRICS,
    "runs": RUNS,
    "errors": ERRORS,
    "training": TRAINING,
    "inputs": INPUTS,
}
"""The result tables by name: the contract users query."""

DEDUP_KEYS: dict[str, str | None] = {
    "predictions": "image_id",
    "class_metrics": "image_id",
    "runs": None,
    "errors": "image_uri",
    "training": "epoch",
    "inputs": "image_uri",
}
"""Per table, the column whose values are kept from the latest file only (None: the run)."""

NAN_AS_NULL: frozenset[str] = frozenset(
    {
        "iou",
        "class_iou",
        "pixel_acc",
        "mean_acc",
        "mean_iou",
        "fw_iou",
        "val_pixel_acc",
        "val_mean_iou",
    }
)
"""Float columns (of any table) where NaN means "undefined" and is stored as null."""

_RUN_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,127}")


# ----------------------------------------------------------------------------- errors


class TableError(Exception):
    """A result-table problem: a bad row, a bad run id, a run in the wrong state."""


class SchemaError(TableError, ValueError):
    """Rows that do not fit a table's schema. ``table`` and ``column`` name the culprit."""

    def __init__(self, table: str, column: str | None, problem: str) -> None:
        where = f"table {table!r}" + (f", column {column!r}" if column is not None else "")
        super().__init__(f"{where}: {problem}")
        self.table = table
        self.column = column


class RunExistsError(TableError, InputError):
    """The run is already committed and ``overwrite`` was not asked for."""


class RunNotCommittedError(TableError, InputError, LookupError):
    """A reader asked for a run that is not committed."""


# ----------------------------------------------------------------------------- run ids


def validate_run_id(run_id: str) -> str:
    """Check that a run id is safe as a file and directory name, and return it.

    A letter, then up to 127 letters, digits, ``-``, ``_`` or ``.``; no ``..``. The leading
    letter keeps a reader that infers types from hive-style paths (``run_id=<id>``) from
    reading an id as a number or a date.

    Args:
        run_id: The id to check.

    Raises:
        ConfigError: The id is not safe (the message names it).
    """
    if not isinstance(run_id, str) or not _RUN_ID_RE.fullmatch(run_id) or ".." in run_id:
        raise ConfigError(
            f"invalid run id {run_id!r}: use a letter, then up to 127 letters, digits, "
            "'-', '_' or '.' (no '..', no '/')"
        )
    return run_id


def runs_row(
    *,
    kind: RunKind,
    input_uri: str,
    model_uri: str | None,
    num_images: int,
    num_errors: int,
    scores: Mapping[str, Any] | None,
    class_names: Sequence[str],
    started_at: datetime,
    finished_at: datetime,
    images_per_s: float | None,
    precision: str | None = None,
    channels_last: bool | None = None,
    engine: str | None = None,
    plan: str | None = None,
    stream: str | None = None,
) -> dict[str, Any]:
    """A run's ``runs`` row (the metrics from ``fcn.metrics.scores``; None without masks).

    Args:
        kind: ``train`` or ``segment``.
        input_uri: The dataset or images the run read.
        model_uri: The model it trained or used.
        num_images: Images trained on or segmented.
        num_errors: Objects that failed.
        scores: The paper's metrics and per-class ``iou`` (NaN or None where undefined).
        class_names: Name per class id.
        started_at: Start (UTC).
        finished_at: End (UTC).
        images_per_s: Throughput.
        precision: What the model ran in (``pipeline.compute``).
        channels_last: Whether it ran in channels_last memory format.
        engine: The runtime that ran it (training: torch).
        plan: How the run was sized (``pipeline.plan``: actors or ranks, threads, batches).
        stream: The incremental stream the run belongs to (``segment --stream``), or None.
    """
    from fcn.metrics import PAPER_METRICS, nan_to_none

    plain = nan_to_none(dict(scores or {}))
    return {
        "kind": kind,
        "input_uri": input_uri,
        "model_uri": model_uri,
        "num_images": num_images,
        "num_errors": num_errors,
        **{key: plain.get(key) for key in PAPER_METRICS},
        "class_names": list(class_names),
        "class_iou": plain.get("iou"),
        "started_at": started_at,
        "finished_at": finished_at,
        "images_per_s": images_per_s,
        "precision": precision,
        "channels_last": channels_last,
        "engine": engine,
        "plan": plan,
        "stream": stream,
    }


def new_run_id(kind: RunKind) -> str:
    """A fresh run id, e.g. ``segment-20261121-063012-ab12cd`` (UTC time, random suffix).

    Args:
        kind: ``train`` or ``segment``.
    """
    check_kind(kind)
    return f"{kind}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def check_kind(kind: str) -> None:
    """Raise ValueError unless ``kind`` is a run kind (``train`` or ``segment``)."""
    if kind not in RUN_KINDS:
        raise ValueError(f"run kind must be one of {', '.join(RUN_KINDS)}, got {kind!r}")


# ----------------------------------------------------------------------------- schemas


def table_schema(table: str) -> pa.Schema:
    """The schema of a result table, with ``run_id``.

    Args:
        table: A name in :data:`TABLES`.

    Raises:
        ValueError: Unknown table (the message lists the known ones).
    """
    try:
        return TABLES[table]
    except KeyError:
        raise ValueError(
            f"unknown result table {table!r}; expected one of {', '.join(TABLES)}"
        ) from None


Rows: TypeAlias = pa.Table | pa.RecordBatch | Mapping[str, Any] | Sequence[Mapping[str, Any]]
"""What writers and :func:`conform` take: an Arrow table or batch, a mapping of column name to
values (e.g. a Ray Data batch of numpy arrays), or a sequence of row dicts."""


def conform(table: str, data: Rows, *, run_id: str | None = None) -> pa.Table:
    """Validate rows against a table's schema and cast them to it.

    Columns are cast safely (no overflow, no lossy conversion); missing nullable columns
    become null; NaN in :data:`NAN_AS_NULL` columns becomes null. Unknown columns, missing or
    null required columns, and naive timestamps are errors.

    Args:
        table: A name in :data:`TABLES`.
        data: The rows (see :data:`Rows`).
        run_id: The run the rows belong to: fills a missing ``run_id`` column, and a present
            one must hold only it. None: ``run_id`` is a required column like any other.

    Raises:
        SchemaError: A row or column does not fit (the message names the table and column).
        ValueError: Unknown table.
    """
    return _conform(table, data, run_id=run_id)


def _conform(table: str, data: Rows, run_id: str | None) -> pa.Table:
    """:func:`conform`; with ``run_id``, a missing run_id column is filled with it and a
    present one must hold only it."""
    schema = table_schema(table)
    columns, num_rows = _columns_of(table, data)
    unknown = [name for name in columns if schema.get_field_index(name) < 0]
    if unknown:
        raise SchemaError(
            table, unknown[0], f"unknown column; expected columns: {', '.join(schema.names)}"
        )
    arrays: list[pa.ChunkedArray] = []
    for fld in schema:
        if fld.name not in columns:
            if fld.name == PARTITION_COLUMN and run_id is not None:
                arrays.append(pa.chunked_array([pa.array([run_id] * num_rows, pa.string())]))
                continue
            if not fld.nullable:
                raise SchemaError(table, fld.name, "required column is missing")
            arrays.append(pa.chunked_array([pa.nulls(num_rows, fld.type)]))
            continue
        arr = _to_arrow(table, fld, columns[fld.name])
        if len(arr) != num_rows:
            raise SchemaError(table, fld.name, f"has {len(arr)} values, expected {num_rows}")
        if fld.name in NAN_AS_NULL:
            arr = pa.chunked_array([_nan_to_null(c) for c in arr.chunks], type=fld.type)
        if not fld.nullable and arr.null_count:
            raise SchemaError(
                table, fld.name, f"{arr.null_count} null value(s) in a required column"
            )
        arrays.append(arr)
    out = pa.Table.from_arrays(arrays, schema=schema)
    if run_id is not None and num_rows:
        other = pc.unique(
            pc.filter(out[PARTITION_COLUMN], pc.not_equal(out[PARTITION_COLUMN], run_id))
        )
        if len(other):
            raise SchemaError(
                table,
                PARTITION_COLUMN,
                f"rows of run {other[0].as_py()!r} given to the writer of run {run_id!r}",
            )
    return out


def _columns_of(table: str, data: Rows) -> tuple[dict[str, Any], int]:
    """Split rows into ``{column: values}`` and the row count."""
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if isinstance(data, pa.Table):
        return {name: data.column(name) for name in data.column_names}, data.num_rows
    if isinstance(data, Mapping):
        lengths = {len(v) for v in data.values()}
        if len(lengths) > 1:
            raise SchemaError(table, None, f"columns of different lengths: {sorted(lengths)}")
        return dict(data), lengths.pop() if lengths else 0
    if isinstance(data, str | bytes) or not isinstance(data, Sequence):
        raise SchemaError(
            table,
            None,
            f"expected a pyarrow Table, a column mapping or row dicts, got {data!r:.80}",
        )
    names: dict[str, None] = {}
    for i, row in enumerate(data):
        if not isinstance(row, Mapping):
            raise SchemaError(table, None, f"row {i} is a {type(row).__name__}, not a mapping")
        names.update(dict.fromkeys(row))
    return {name: [row.get(name) for row in data] for name in names}, len(data)


def _to_arrow(table: str, fld: pa.Field, values: Any) -> pa.ChunkedArray:
    """One column as a ChunkedArray of the field's type, or a SchemaError saying why not."""
    expected = f"expected {fld.type}"
    if isinstance(values, pa.Array) and isinstance(values.type, pa.ExtensionType):
        values = values.storage  # e.g. Ray Data's tensor columns: cast their list storage
    if isinstance(values, pa.ChunkedArray) and isinstance(values.type, pa.ExtensionType):
        values = pa.chunked_array([c.storage for c in values.chunks], values.type.storage_type)
    if isinstance(values, np.ndarray) and values.ndim > 1:
        values = list(values)  # (rows, n) -> one list per row
    try:
        if isinstance(values, pa.ChunkedArray | pa.Array):
            if pa.types.is_timestamp(fld.type) and _is_naive(values.type):
                raise SchemaError(table, fld.name, f"naive {values.type}; use tz-aware UTC times")
            cast = pc.cast(values, fld.type, safe=True)
            return cast if isinstance(cast, pa.ChunkedArray) else pa.chunked_array([cast])
        if pa.types.is_timestamp(fld.type):
            values = list(values)
            if any(isinstance(v, datetime) and v.tzinfo is None for v in values):
                raise SchemaError(
                    table, fld.name, "naive datetime; use tz-aware times (datetime.now(UTC))"
                )
            arr = pa.array(values)
            if _is_naive(arr.type):
                raise SchemaError(table, fld.name, f"naive {arr.type}; use tz-aware UTC times")
            return pa.chunked_array([pc.cast(arr, fld.type, safe=True)])
        return pa.chunked_array([pa.array(values, type=fld.type)])
    except SchemaError:
        raise
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
        raise SchemaError(table, fld.name, f"{expected}: {exc}") from None


def _is_naive(type_: pa.DataType) -> bool:
    return bool(pa.types.is_timestamp(type_) and type_.tz is None)


def _nan_to_null(arr: pa.Array) -> pa.Array:
    """NaN -> null in a float array or a list of floats."""
    if pa.types.is_floating(arr.type):
        return pc.if_else(pc.is_nan(arr), pa.scalar(None, arr.type), arr)
    if pa.types.is_list(arr.type) and pa.types.is_floating(arr.type.value_type):
        start, end = arr.offsets[0].as_py(), arr.offsets[-1].as_py()
        values = _nan_to_null(arr.values.slice(start, end - start))
        offsets = pc.subtract(arr.offsets, pa.scalar(start, pa.int32()))
        return pa.ListArray.from_arrays(offsets, values, type=arr.type, mask=arr.is_null())
    return arr
