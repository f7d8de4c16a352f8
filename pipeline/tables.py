"""Result tables: the schemas users query, the writers the jobs use, and the commit protocol.

Under an output root ``OUT`` each table of :data:`TABLES` is a directory of zstd Parquet files,
hive-partitioned by run::

    OUT/<table>/run_id=<run_id>/part-<utc stamp>-<writer>-<seq>-<rand>.parquet
    OUT/_committed/<run_id>.json          # the commit marker, written last

The ``run_id`` column is *not* stored inside the files: the ``run_id=<id>`` directory is its
one source. The readers here add it back as a string column. Reading a table directory
directly also works (``pyarrow.dataset.dataset(..., partitioning=HIVE_PARTITIONING)``, DuckDB
``read_parquet(..., hive_partitioning=true, hive_types={'run_id': VARCHAR})``) but sees
uncommitted runs too, and with type inference (``partitioning="hive"`` or DuckDB without
``hive_types``) an id that looks like a number or a date would not come back as a string;
run ids start with a letter (:func:`validate_run_id`) to make that rare.

Protocol (one attempt of a run at a time; many writers inside an attempt):

1. The driver opens a :class:`RunWriter`. If the run's marker exists it refuses, unless
   ``overwrite=True``: then it deletes the marker *first* (the run is invisible from that
   moment, so a crash mid-delete exposes nothing) and then the run's partition directories.
   If there is no marker but files of a crashed attempt, it *resumes*: unreadable Parquet files
   (truncated by a crash) and temporary leftovers are deleted, good files are kept, and
   :meth:`RunWriter.existing_ids` tells the job what is already done.
2. Rows go through buffered :class:`TableWriter` objects (one per Ray actor or thread; the
   driver has its own through :meth:`RunWriter.write`). Each flush writes one whole Parquet
   file atomically under a unique name; writers share nothing else.
3. After every writer is closed, :meth:`RunWriter.commit` lists the run's partition
   directories, reads each file's footer and key column, drops superseded rows (below), and
   writes the marker listing every file with its row count. Readers
   (:func:`committed_runs`, :func:`read_table`, :func:`table_dataset`,
   :func:`duckdb_connection`) read committed runs only, and only the files their marker
   lists, so a stray file of a crashed attempt is never visible.

Dedup rule (exactly one copy of each key after a resume or a retried task): each table has a
key (:data:`DEDUP_KEYS`): ``image_id`` for ``predictions`` and ``class_metrics``, ``image_uri``
for ``errors``, ``epoch`` for ``training``, and the whole run for ``runs``. At commit, for each
key value only the rows of the *latest* file holding it are kept (files order by their name,
which starts with the UTC time of the flush); earlier files losing some rows are rewritten
without them, those losing all are left out, and the superseded files are deleted after the
marker is written. So a resumed training run that redoes epoch 4 keeps the new epoch-4 row,
and a ``runs`` row written by a crashed attempt gives way to the final one.

NaN in the metric columns that the contract defines as null where undefined (:data:`NAN_AS_NULL`:
``iou``, ``class_iou``, ``pixel_acc``, ``mean_acc``, ``mean_iou``, ``fw_iou``,
``val_pixel_acc``, ``val_mean_iou``) is stored as null, so SQL aggregates skip it.

Example::

    run = RunWriter("s3://bucket/out", new_run_id("segment"), "segment")
    done = run.existing_ids("predictions")           # resume: skip these
    writer = run.writer("predictions")              # send to an actor, or use here
    writer.write([{"image_id": "a", ...}]); writer.close()
    run.write("runs", [{...}])
    run.commit(extra={"model_uri": "..."})
    read_table("s3://bucket/out", "runs")
"""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import ConfigError, InputError
from pipeline.storage import (
    Location,
    StorageOptions,
    delete,
    exists,
    list_files,
    read_bytes,
    resolve,
    write_bytes,
)

if TYPE_CHECKING:
    import duckdb

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the marker and file layout; readers refuse markers of a newer version."""

PARTITION_COLUMN = "run_id"
"""The hive partition column, supplied by the directory name, not stored in the files."""

MARKER_DIR = "_committed"
"""Directory under ``OUT`` holding one ``<run_id>.json`` marker per committed run."""

DEFAULT_MAX_ROWS = 100_000
"""A :class:`TableWriter` writes a file once it holds this many rows."""

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
    ]
)
"""One row per failed object."""

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
}
"""The result tables by name: the contract users query."""

DEDUP_KEYS: dict[str, str | None] = {
    "predictions": "image_id",
    "class_metrics": "image_id",
    "runs": None,
    "errors": "image_uri",
    "training": "epoch",
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

HIVE_PARTITIONING = ds.partitioning(pa.schema([_RUN_ID.with_nullable(True)]), flavor="hive")
"""The partitioning to read a table directory directly with ``pyarrow.dataset`` (run_id string)."""

_RUN_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,127}")
_WRITER_ID_RE = re.compile(r"[A-Za-z0-9_]{1,64}")
_PART_RE = re.compile(r"part-[A-Za-z0-9_-]+\.parquet")


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
    """A reader asked for a run that has no commit marker."""


# ----------------------------------------------------------------------------- run ids


def validate_run_id(run_id: str) -> str:
    """Check that a run id is safe as a file and directory name, and return it.

    A letter, then up to 127 letters, digits, ``-``, ``_`` or ``.``; no ``..``. The leading
    letter keeps hive type inference from reading an id as a number or a date.

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


def check_not_committed(
    out_uri: str | Location, run_id: str, overwrite: bool, options: StorageOptions | None = None
) -> None:
    """Refuse a committed run unless it is to be overwritten (jobs call it before any work).

    Raises:
        RunExistsError: The run is committed and ``overwrite`` is False.
    """
    if not overwrite and is_committed(out_uri, run_id, options):
        raise RunExistsError(
            f"run {run_id!r} is already committed under {resolve(out_uri, options).uri}; pass "
            "overwrite=True (--overwrite) to replace it, or use a new run id"
        )


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
    }


def new_run_id(kind: RunKind) -> str:
    """A fresh run id, e.g. ``segment-20261121-063012-ab12cd`` (UTC time, random suffix).

    Args:
        kind: ``train`` or ``segment``.
    """
    _check_kind(kind)
    return f"{kind}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _check_kind(kind: str) -> None:
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


def file_schema(table: str) -> pa.Schema:
    """The schema of a table's Parquet files: the table's schema without ``run_id``.

    Args:
        table: A name in :data:`TABLES`.
    """
    schema = table_schema(table)
    return schema.remove(schema.get_field_index(PARTITION_COLUMN))


Rows: TypeAlias = pa.Table | pa.RecordBatch | Mapping[str, Any] | Sequence[Mapping[str, Any]]
"""What writers and :func:`conform` take: an Arrow table or batch, a mapping of column name to
values (e.g. a Ray Data batch of numpy arrays), or a sequence of row dicts."""


def conform(table: str, data: Rows) -> pa.Table:
    """Validate rows against a table's schema and cast them to it.

    Columns are cast safely (no overflow, no lossy conversion); missing nullable columns
    become null; NaN in :data:`NAN_AS_NULL` columns becomes null. Unknown columns, missing or
    null required columns, and naive timestamps are errors.

    Args:
        table: A name in :data:`TABLES`.
        data: The rows (see :data:`Rows`).

    Raises:
        SchemaError: A row or column does not fit (the message names the table and column).
        ValueError: Unknown table.
    """
    return _conform(table, data, run_id=None)


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


# ----------------------------------------------------------------------------- markers


@dataclass(frozen=True)
class PartFile:
    """One Parquet file of a run, as a marker lists it."""

    path: str
    """Path relative to ``OUT``: ``<table>/run_id=<id>/part-....parquet``."""
    rows: int
    """Number of rows."""


@dataclass(frozen=True, kw_only=True)
class CommitMarker:
    """The content of ``OUT/_committed/<run_id>.json``: what a committed run consists of."""

    run_id: str
    """Its id."""
    kind: str
    """``train`` or ``segment``."""
    finished_at: datetime
    """When the run finished (UTC)."""
    tables: dict[str, tuple[PartFile, ...]]
    """Per table with files, every file that belongs to the run."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything JSON the job adds (e.g. the model URI)."""
    format_version: int = FORMAT_VERSION
    """Layout version."""

    def rows(self, table: str) -> int:
        """Rows the run has in a table.

        Args:
            table: A name in :data:`TABLES`.
        """
        return sum(f.rows for f in self.tables.get(table, ()))

    def to_json(self) -> bytes:
        """The marker's JSON bytes."""
        doc = {
            "format_version": self.format_version,
            "run_id": self.run_id,
            "kind": self.kind,
            "finished_at": self.finished_at.isoformat(),
            "tables": {
                table: {
                    "rows": sum(f.rows for f in files),
                    "files": [{"path": f.path, "rows": f.rows} for f in files],
                }
                for table, files in self.tables.items()
            },
            "extra": self.extra,
        }
        return (json.dumps(doc, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, source: str) -> CommitMarker:
        """Parse and check a marker.

        Args:
            data: The JSON bytes.
            source: Where it came from, for error messages.

        Raises:
            TableError: Not a marker, a newer format, or a file outside the run.
        """
        try:
            doc = json.loads(data)
            version = int(doc["format_version"])
            if version > FORMAT_VERSION:
                raise TableError(
                    f"{source}: commit marker format {version} is newer than this fcnpipe "
                    f"reads ({FORMAT_VERSION}); upgrade fcnpipe"
                )
            run_id = validate_run_id(doc["run_id"])
            tables: dict[str, tuple[PartFile, ...]] = {}
            for table, entry in doc["tables"].items():
                prefix = f"{table}/{PARTITION_COLUMN}={run_id}/"
                files = tuple(PartFile(str(f["path"]), int(f["rows"])) for f in entry["files"])
                for f in files:
                    name = f.path[len(prefix) :]
                    if table not in TABLES or not f.path.startswith(prefix) or "/" in name:
                        raise TableError(f"{source}: file {f.path!r} is not part of the run")
                tables[table] = files
            finished_at = datetime.fromisoformat(doc["finished_at"])
            return cls(
                run_id=run_id,
                kind=str(doc["kind"]),
                finished_at=finished_at,
                tables=tables,
                extra=dict(doc.get("extra") or {}),
                format_version=version,
            )
        except TableError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TableError(f"{source}: not a valid commit marker ({exc})") from None


def _marker_location(root: Location, run_id: str) -> Location:
    return root.join(MARKER_DIR, f"{validate_run_id(run_id)}.json")


def _partition(root: Location, table: str, run_id: str) -> Location:
    return root.join(table, f"{PARTITION_COLUMN}={run_id}")


def is_committed(
    out_uri: str | Location, run_id: str, options: StorageOptions | None = None
) -> bool:
    """Whether a run's commit marker exists.

    Args:
        out_uri: The output root.
        run_id: The run.
        options: Storage options for a string URI.
    """
    return exists(_marker_location(resolve(out_uri, options), run_id))


def committed_runs(out_uri: str | Location, options: StorageOptions | None = None) -> list[str]:
    """The ids of all committed runs, sorted.

    Args:
        out_uri: The output root.
        options: Storage options for a string URI.
    """
    root = resolve(out_uri, options)
    ids = []
    for info in list_files(root.join(MARKER_DIR), suffixes=(".json",)):
        run_id = info.relpath[: -len(".json")]
        if "/" not in run_id and _RUN_ID_RE.fullmatch(run_id) and ".." not in run_id:
            ids.append(run_id)
    return sorted(ids)


def load_marker(
    out_uri: str | Location, run_id: str, options: StorageOptions | None = None
) -> CommitMarker:
    """A committed run's marker.

    Args:
        out_uri: The output root.
        run_id: The run.
        options: Storage options for a string URI.

    Raises:
        RunNotCommittedError: The run has no marker.
    """
    root = resolve(out_uri, options)
    loc = _marker_location(root, run_id)
    try:
        data = read_bytes(loc)
    except FileNotFoundError:
        raise RunNotCommittedError(
            f"run {run_id!r} is not committed under {root} (no {MARKER_DIR}/{run_id}.json)"
        ) from None
    marker = CommitMarker.from_json(data, loc.uri)
    if marker.run_id != run_id:
        raise TableError(f"{loc.uri}: marker names run {marker.run_id!r}, not {run_id!r}")
    return marker


# ----------------------------------------------------------------------------- readers


def table_dataset(
    out_uri: str | Location,
    table: str,
    run_ids: Iterable[str] | None = None,
    options: StorageOptions | None = None,
) -> ds.Dataset:
    """A lazy ``pyarrow.dataset`` over a table's committed files (the files markers list).

    Args:
        out_uri: The output root.
        table: A name in :data:`TABLES`.
        run_ids: Only these runs (each must be committed); None: every committed run.
        options: Storage options for a string URI.

    Raises:
        RunNotCommittedError: A requested run is not committed.
    """
    root = resolve(out_uri, options)
    return _dataset(root.pyarrow_fs(), table, _markers(root, run_ids))


def read_table(
    out_uri: str | Location,
    table: str,
    run_ids: Iterable[str] | None = None,
    *,
    columns: Sequence[str] | None = None,
    options: StorageOptions | None = None,
) -> pa.Table:
    """A table's rows from committed runs only, ``run_id`` included as a string column.

    Args:
        out_uri: The output root.
        table: A name in :data:`TABLES`.
        run_ids: Only these runs (each must be committed); None: every committed run.
        columns: Only these columns; None: all, in schema order.
        options: Storage options for a string URI.

    Raises:
        RunNotCommittedError: A requested run is not committed.
    """
    dataset = table_dataset(out_uri, table, run_ids, options)
    return dataset.to_table(columns=list(columns) if columns is not None else None)


def duckdb_connection(
    out_uri: str | Location,
    run_ids: Iterable[str] | None = None,
    options: StorageOptions | None = None,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per table over committed runs only.

    Views ``predictions``, ``class_metrics``, ``runs``, ``errors`` and ``training`` scan the
    marker-listed files lazily through :mod:`pipeline.storage` filesystems (no DuckDB
    extension needed); a table without committed rows is an empty view with its columns.

    Args:
        out_uri: The output root.
        run_ids: Only these runs (each must be committed); None: every committed run.
        options: Storage options for a string URI.

    Raises:
        RunNotCommittedError: A requested run is not committed.
    """
    import duckdb  # imported here: Ray workers writing tables never need it

    root = resolve(out_uri, options)
    markers = _markers(root, run_ids)
    con = duckdb.connect()
    filesystem = root.pyarrow_fs()
    for table in TABLES:
        dataset = _dataset(filesystem, table, markers)
        # An Arrow table, not an empty dataset, so DuckDB sees the columns without a scan.
        con.register(table, dataset if dataset.files else TABLES[table].empty_table())
    return con


def _markers(root: Location, run_ids: Iterable[str] | None) -> list[CommitMarker]:
    if isinstance(run_ids, str):  # one id, not its characters
        run_ids = [run_ids]
    ids = committed_runs(root) if run_ids is None else [validate_run_id(r) for r in run_ids]
    return [load_marker(root, run_id) for run_id in dict.fromkeys(ids)]


def _dataset(
    filesystem: tuple[pafs.FileSystem, str], table: str, markers: Sequence[CommitMarker]
) -> ds.FileSystemDataset:
    """The marker-listed files of a table; ``filesystem`` is the root's ``pyarrow_fs()``."""
    schema = table_schema(table)
    fs, base = filesystem
    paths: list[str] = []
    partitions: list[pc.Expression] = []
    for marker in markers:
        for f in marker.tables.get(table, ()):
            paths.append(f"{base.rstrip('/')}/{f.path}")
            # The partition expression is how the dataset fills the run_id column.
            partitions.append(pc.field(PARTITION_COLUMN) == pa.scalar(marker.run_id, pa.string()))
    return ds.FileSystemDataset.from_paths(
        paths, schema=schema, format=ds.ParquetFileFormat(), filesystem=fs, partitions=partitions
    )


# ----------------------------------------------------------------------------- writers


class TableWriter:
    """Buffered writer of one table's rows for one run.

    Rows accumulate in memory and go out as one Parquet file (zstd) per ``max_rows`` rows or
    ``max_bytes`` bytes, written whole and atomically under
    ``OUT/<table>/run_id=<id>/part-<utc stamp>-<writer_id>-<seq>-<rand>.parquet``. Names are
    unique per file (the random part covers copies of one pickled writer), so any number of
    writers (Ray actors, threads) can write the same run at once; each writer itself is for
    one thread. Nothing is visible to readers until the run is committed
    (:meth:`RunWriter.commit`, after every writer is closed).

    Args:
        out_uri: The output root.
        run_id: The run (see :func:`validate_run_id`).
        table: A name in :data:`TABLES`.
        writer_id: A short name in the file names (letters, digits, ``_``), e.g. the actor
            rank; default: random.
        max_rows: Rows per file.
        max_bytes: Arrow bytes per file.
        options: Storage options for a string URI.
    """

    def __init__(
        self,
        out_uri: str | Location,
        run_id: str,
        table: str,
        *,
        writer_id: str | None = None,
        max_rows: int = DEFAULT_MAX_ROWS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        options: StorageOptions | None = None,
    ) -> None:
        self.run_id = validate_run_id(run_id)
        table_schema(table)
        self.table = table
        self.writer_id = writer_id if writer_id is not None else uuid.uuid4().hex[:8]
        if not _WRITER_ID_RE.fullmatch(self.writer_id):
            raise ValueError(f"writer_id must be 1-64 letters, digits or '_': {self.writer_id!r}")
        if max_rows < 1 or max_bytes < 1:
            raise ValueError(f"max_rows and max_bytes must be >= 1: {max_rows}, {max_bytes}")
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._root = resolve(out_uri, options)
        self._chunks: list[pa.Table] = []
        self._rows = 0
        self._bytes = 0
        self._seq = 0
        self._files: list[PartFile] = []
        self._closed = False

    @property
    def files(self) -> list[PartFile]:
        """The files written so far."""
        return list(self._files)

    @property
    def buffered_rows(self) -> int:
        """Rows written but not yet in a file."""
        return self._rows

    @property
    def buffered_bytes(self) -> int:
        """Arrow bytes of the rows not yet in a file."""
        return self._bytes

    def write(self, rows: Rows) -> None:
        """Add rows (validated now); writes files when the buffer is full.

        Args:
            rows: Rows of this writer's table; ``run_id`` may be left out (it is the
                writer's) and, if given, must be the writer's.

        Raises:
            SchemaError: The rows do not fit the table.
        """
        if self._closed:
            raise TableError(f"writer of {self.table!r} for run {self.run_id!r} is closed")
        conformed = _conform(self.table, rows, run_id=self.run_id).drop_columns([PARTITION_COLUMN])
        if not conformed.num_rows:
            return
        self._chunks.append(conformed)
        self._rows += conformed.num_rows
        self._bytes += conformed.nbytes
        if self._rows >= self.max_rows or self._bytes >= self.max_bytes:
            self._flush(full_only=True)

    def flush(self) -> list[PartFile]:
        """Write all buffered rows to file(s) now; returns the new files."""
        return self._flush(full_only=False)

    def _flush(self, full_only: bool) -> list[PartFile]:
        """Write the buffer in files of at most ``max_rows`` rows / ``max_bytes`` bytes; with
        ``full_only``, keep a last, partial file's rows buffered for the next write."""
        if not self._rows:
            return []
        data = pa.concat_tables(self._chunks).combine_chunks()
        per_row = max(1.0, data.nbytes / data.num_rows)
        step = max(1, min(self.max_rows, int(self.max_bytes / per_row)))
        end = data.num_rows - data.num_rows % step if full_only else data.num_rows
        new: list[PartFile] = []
        for start in range(0, end, step):
            self._seq += 1
            chunk = data.slice(start, min(step, end - start))
            new.append(
                _write_part(self._root, self.table, self.run_id, self.writer_id, self._seq, chunk)
            )
        rest = data.slice(end)
        self._chunks = [rest] if rest.num_rows else []
        self._rows, self._bytes = rest.num_rows, rest.nbytes
        self._files.extend(new)
        return new

    def close(self) -> list[PartFile]:
        """Flush and close; returns every file this writer wrote."""
        if not self._closed:
            self.flush()
            self._closed = True
        return self.files

    def __getstate__(self) -> dict[str, Any]:
        # A copy sent to an actor starts empty: rows buffered here would be written twice.
        if self._rows:
            raise TableError(
                f"a writer of {self.table!r} holding {self._rows} unwritten row(s) cannot be "
                "pickled; send writers to actors before writing, or flush first"
            )
        return {**self.__dict__, "_files": []}

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        # Close (flush) only on success; after an error the caller decides (a rerun resumes).
        if exc_type is None:
            self.close()


def _write_part(
    root: Location, table: str, run_id: str, writer_id: str, seq: int, data: pa.Table
) -> PartFile:
    """Serialize rows into one Parquet file and write it atomically; return it."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    name = f"part-{stamp}-{writer_id}-{seq:05d}-{secrets.token_hex(3)}.parquet"
    rel = f"{table}/{PARTITION_COLUMN}={run_id}/{name}"
    meta = {b"fcnpipe.table": table.encode(), b"fcnpipe.format_version": b"%d" % FORMAT_VERSION}
    buf = io.BytesIO()
    pq.write_table(data.replace_schema_metadata(meta), buf, compression="zstd")
    write_bytes(root.join(rel), buf.getvalue())
    return PartFile(rel, data.num_rows)


@dataclass
class _Scanned:
    """A readable part file found in a run's partition."""

    part: PartFile
    keys: pa.Array | None  # the key column, when asked for


class RunWriter:
    """Driver side of one run: start (refuse, overwrite or resume), write, commit.

    Starting: a committed run raises :class:`RunExistsError` unless ``overwrite``; with
    ``overwrite`` the marker is deleted first, then the run's partition directories, and the
    run starts empty (also when there was no marker). Without a marker, files of a crashed
    attempt are kept (unreadable ones and temporary leftovers are deleted) and the run
    resumes: see :meth:`existing_ids`. Only one attempt of a run may be running at a time.

    Writing: :meth:`write` buffers rows in the driver's own writer per table; :meth:`writer`
    makes a :class:`TableWriter` for an actor or thread (it pickles, holding no credentials).

    Committing: :meth:`commit`, after every writer is closed, writes the marker last.

    Args:
        out_uri: The output root.
        run_id: The run (see :func:`validate_run_id`).
        kind: ``train`` or ``segment``.
        overwrite: Replace a committed run (or start a crashed one afresh).
        max_rows: Rows per file for the writers made here.
        max_bytes: Arrow bytes per file for the writers made here.
        options: Storage options for a string URI.

    Raises:
        RunExistsError: The run is committed and ``overwrite`` is False.
        ValueError: Bad run id or kind.
    """

    def __init__(
        self,
        out_uri: str | Location,
        run_id: str,
        kind: RunKind,
        *,
        overwrite: bool = False,
        max_rows: int = DEFAULT_MAX_ROWS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        options: StorageOptions | None = None,
    ) -> None:
        self.run_id = validate_run_id(run_id)
        _check_kind(kind)
        self.kind = kind
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._root = resolve(out_uri, options)
        self._marker = _marker_location(self._root, run_id)
        self._writers: dict[str, TableWriter] = {}
        self._committed = False
        self._pafs: pafs.FileSystem | None = None
        if exists(self._marker):
            check_not_committed(self._root, run_id, overwrite)
            # Marker first: from here on the run is invisible, whatever happens next.
            delete(self._marker)
        if overwrite:
            for table in TABLES:
                delete(_partition(self._root, table, run_id))
            self.resumed_files: dict[str, list[PartFile]] = {}
        else:
            self.resumed_files = self._recover()
        if self.resumed_files:
            logger.info(
                "run %s: resuming with %s",
                run_id,
                ", ".join(f"{len(v)} {t} file(s)" for t, v in self.resumed_files.items()),
            )

    @property
    def out_uri(self) -> str:
        """The output root URI."""
        return self._root.uri

    @property
    def resumed(self) -> bool:
        """Whether files of an earlier attempt were found and kept."""
        return bool(self.resumed_files)

    def writer(self, table: str, *, writer_id: str | None = None) -> TableWriter:
        """A new buffered writer of this run for one actor or thread.

        Args:
            table: A name in :data:`TABLES`.
            writer_id: A short name in the file names (e.g. the actor rank); default random.
        """
        return TableWriter(
            self._root,
            self.run_id,
            table,
            writer_id=writer_id,
            max_rows=self.max_rows,
            max_bytes=self.max_bytes,
        )

    def write(self, table: str, rows: Rows) -> None:
        """Buffer rows in the driver's own writer for a table (not thread-safe).

        Args:
            table: A name in :data:`TABLES`.
            rows: The rows; ``run_id`` may be left out.
        """
        self._check_open()
        if table not in self._writers:
            self._writers[table] = self.writer(table, writer_id=f"driver_{secrets.token_hex(2)}")
        self._writers[table].write(rows)

    def flush(self) -> None:
        """Write the driver's buffered rows to files now."""
        for w in self._writers.values():
            w.flush()

    def existing_ids(self, table: str, key: str = "image_id") -> set[Any]:
        """The key values already written in this run (readable files and the driver's buffer).

        After a crash, this is what the job can skip: e.g. ``existing_ids("predictions")`` for
        the segmentation job, ``existing_ids("training", key="epoch")`` for training.

        Args:
            table: A name in :data:`TABLES`.
            key: A column of the table.
        """
        schema = table_schema(table)
        if key == PARTITION_COLUMN or schema.get_field_index(key) < 0:
            raise SchemaError(table, key, "not a column of the table's files")
        arrays = [s.keys for s in self._scan(table, key) if s.keys is not None]
        if table in self._writers:
            arrays.extend(c.column(key).combine_chunks() for c in self._writers[table]._chunks)
        if not arrays:
            return set()
        return set(pc.unique(pa.chunked_array(arrays, type=schema.field(key).type)).to_pylist())

    def iter_written(self, table: str, columns: Sequence[str]) -> Iterator[pa.Table]:
        """The rows written so far in this run (all attempts), one file's worth at a time.

        Flushes the driver's buffer first. Rows a later file supersedes (the dedup rule of
        :data:`DEDUP_KEYS`) are left out, so this is what :meth:`commit` will list, read in
        bounded memory: e.g. to sum a run's per-class counts across attempts.

        Args:
            table: A name in :data:`TABLES`.
            columns: Columns to read (``run_id`` is not stored in the files).
        """
        self._check_open()
        if table in self._writers:
            self._writers[table].flush()
        key = DEDUP_KEYS[table]
        scanned = [s for s in self._scan(table, key) if s.part.rows]
        if key is None:  # the whole run is the key: only the latest file counts
            scanned = scanned[-1:]
        wanted = list(columns) if key is None or key in columns else [*columns, key]
        owned = self._owned_keys(scanned) if key is not None else None
        fs = self._fs()
        for i, part in enumerate(scanned):
            with fs.open_input_file(self._root.join(part.part.path).path) as f:
                data = pq.ParquetFile(f).read(columns=wanted)
            if owned is not None and key is not None:
                # Keep the rows whose key this file is the latest to hold.
                data = data.filter(pc.is_in(data[key], value_set=owned[i]))
            yield data.select(list(columns))

    @staticmethod
    def _owned_keys(scanned: list[_Scanned]) -> list[pa.Array]:
        """Per file, the keys whose latest file it is (one group-by over all keys)."""
        keyed = [s for s in scanned if s.keys is not None]
        if not keyed:
            return [pa.array([], pa.string()) for _ in scanned]
        owners = pa.table(
            {
                "k": pa.chunked_array([s.keys for s in keyed]),
                "f": pa.chunked_array(
                    [
                        pa.array([i] * len(s.keys), pa.int32())
                        for i, s in enumerate(scanned)
                        if s.keys is not None
                    ]
                ),
            }
        )
        latest = owners.group_by("k").aggregate([("f", "max")]).sort_by("f_max")
        bounds = np.searchsorted(latest["f_max"].to_numpy(), np.arange(len(scanned) + 1))
        keys = latest["k"].combine_chunks()
        return [keys.slice(bounds[i], bounds[i + 1] - bounds[i]) for i in range(len(scanned))]

    def commit(
        self, extra: Mapping[str, Any] | None = None, *, finished_at: datetime | None = None
    ) -> CommitMarker:
        """Flush, settle the run's files (dedup), and write the marker last, atomically.

        Every :class:`TableWriter` of the run must be closed before (their files are found by
        listing the run's partitions, which also picks up files of an earlier attempt).

        Args:
            extra: JSON-serializable facts to keep in the marker (never credentials).
            finished_at: When the run finished (tz-aware); default now.

        Raises:
            RunExistsError: Someone committed this run meanwhile.
        """
        self._check_open()
        for w in self._writers.values():
            w.close()
        finished = finished_at or datetime.now(UTC)
        if finished.tzinfo is None:
            raise ValueError("finished_at must be tz-aware (datetime.now(UTC))")
        extra_doc = json.loads(json.dumps(dict(extra or {}), allow_nan=False))
        tables: dict[str, tuple[PartFile, ...]] = {}
        superseded: list[PartFile] = []
        for table in TABLES:
            kept, dropped = self._settle(table)
            if kept:
                tables[table] = tuple(kept)
            superseded.extend(dropped)
        marker = CommitMarker(
            run_id=self.run_id,
            kind=self.kind,
            finished_at=finished.astimezone(UTC),
            tables=tables,
            extra=extra_doc,
        )
        if exists(self._marker):
            raise RunExistsError(f"run {self.run_id!r} was committed by someone else meanwhile")
        write_bytes(self._marker, marker.to_json())
        self._committed = True
        # After the marker: a crash before this point leaves only unlisted, invisible files.
        for part in superseded:
            delete(self._root.join(part.path))
        logger.info(
            "run %s committed: %s",
            self.run_id,
            ", ".join(f"{marker.rows(t)} {t}" for t in tables) or "no rows",
        )
        return marker

    def _check_open(self) -> None:
        if self._committed:
            raise TableError(f"run {self.run_id!r} is already committed by this writer")

    def _recover(self) -> dict[str, list[PartFile]]:
        """Keep the readable files of a crashed attempt; delete the rest of its debris."""
        found: dict[str, list[PartFile]] = {}
        for table in TABLES:
            parts = [s.part for s in self._scan(table, None, delete_bad=True)]
            if parts:
                found[table] = parts
        return found

    def _scan(self, table: str, key: str | None, *, delete_bad: bool = False) -> list[_Scanned]:
        """The run's readable part files of a table, oldest first, with their key column.

        Unreadable files (a truncated write) and other debris are skipped with a warning,
        and deleted when ``delete_bad``.
        """
        partition = _partition(self._root, table, self.run_id)
        fs = self._fs()
        expected = file_schema(table)
        out: list[_Scanned] = []
        for info in list_files(partition):
            loc = partition.join(info.relpath)
            rel = f"{table}/{PARTITION_COLUMN}={self.run_id}/{info.relpath}"
            if not _PART_RE.fullmatch(info.relpath):
                self._bad(loc, "not a part file", delete_bad)
                continue
            try:
                with fs.open_input_file(loc.path) as f:
                    pf = pq.ParquetFile(f)
                    num_rows = pf.metadata.num_rows
                    if pf.schema_arrow.names != expected.names:
                        raise TableError(
                            f"{loc.uri}: columns {pf.schema_arrow.names} are not those of "
                            f"{table!r} ({expected.names}); rerun with overwrite=True"
                        )
                    keys = pf.read(columns=[key]).column(0).combine_chunks() if key else None
            except pa.ArrowInvalid as exc:  # truncated or not Parquet; not an I/O error
                self._bad(loc, f"unreadable ({exc})", delete_bad)
                continue
            out.append(_Scanned(PartFile(rel, num_rows), keys))
        out.sort(key=lambda s: s.part.path)
        return out

    @staticmethod
    def _bad(loc: Location, why: str, delete_bad: bool) -> None:
        if delete_bad:
            logger.warning("deleting %s: %s, left by an earlier attempt", loc.uri, why)
            delete(loc)
        else:
            logger.warning("ignoring %s: %s", loc.uri, why)

    def _settle(self, table: str) -> tuple[list[PartFile], list[PartFile]]:
        """Apply the dedup rule to a table's files: (files to list, files superseded)."""
        key = DEDUP_KEYS[table]
        scanned = [s for s in self._scan(table, key) if s.part.rows]
        if not scanned:
            return [], []
        if key is None:  # the whole run is one key: the latest file wins
            return [scanned[-1].part], [s.part for s in scanned[:-1]]
        # For each key value, the index of the latest file holding it.
        owners = pa.table(
            {
                "k": pa.chunked_array([s.keys for s in scanned if s.keys is not None]),
                "f": pa.chunked_array(
                    [pa.array([i] * s.part.rows, pa.int32()) for i, s in enumerate(scanned)]
                ),
            }
        )
        latest = owners.group_by("k").aggregate([("f", "max")])
        joined = owners.join(latest, "k")
        stale = joined.filter(pc.less(joined["f"], joined["f_max"]))
        kept: list[PartFile] = []
        dropped: list[PartFile] = []
        for i, s in enumerate(scanned):
            stale_keys = pc.unique(stale.filter(pc.equal(stale["f"], i))["k"])
            if not len(stale_keys):
                kept.append(s.part)
                continue
            dropped.append(s.part)
            with self._fs().open_input_file(self._root.join(s.part.path).path) as f:
                data = pq.ParquetFile(f).read()
            rest = data.filter(pc.invert(pc.is_in(data[key], value_set=stale_keys)))
            logger.info(
                "run %s: %d %s row(s) of %s superseded by later files",
                self.run_id,
                data.num_rows - rest.num_rows,
                table,
                s.part.path,
            )
            if rest.num_rows:
                rest = rest.cast(file_schema(table))
                kept.append(_write_part(self._root, table, self.run_id, "commit", i, rest))
        return kept, dropped

    def _fs(self) -> pafs.FileSystem:
        """The pyarrow filesystem of the output root, built once."""
        if self._pafs is None:
            self._pafs = self._root.pyarrow_fs()[0]
        return self._pafs
