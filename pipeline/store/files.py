"""Data files of a run: written by whoever holds the rows (a Ray worker, or the driver).

A :class:`TableWriter` buffers one table's rows for one run and writes them as whole zstd
Parquet files, each atomically (local: a temporary name renamed; S3: one PUT), under the
table's data directory in Iceberg's layout::

    OUT/<table>/data/run_id=<run_id>/part-<utc stamp>-<writer>-<seq>-<rand>.parquet

The files carry every column (``run_id`` included, as Iceberg engines expect of an identity
partition) with the table's Iceberg field ids, so the driver can commit them as they are, and
names that sort by the time of writing (the commit keeps, per key, the rows of the latest
file). A written file is invisible to every reader until the driver commits it
(:meth:`pipeline.store.runs.RunWriter.commit`); one that never is (a crashed attempt that is
not resumed, a superseded one) is an orphan that ``fcnpipe tables maintain`` deletes.

What a worker needs is a :class:`TableTarget` (the directory, the schema with field ids): it
pickles, holds no credentials and no catalog, and this module imports neither pyiceberg nor
SQLAlchemy.
"""

from __future__ import annotations

import functools
import io
import re
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import Location, StorageOptions, resolve, write_bytes
from pipeline.tables import (
    DEDUP_KEYS,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ROWS,
    Rows,
    TableError,
    conform,
    validate_run_id,
)

__all__ = ["PART_RE", "TableTarget", "TableWriter", "encode_part", "fs_path"]

PART_RE = re.compile(r"part-[A-Za-z0-9_-]+\.parquet")
"""Names of the data files fcnpipe writes."""

_WRITER_ID_RE = re.compile(r"[A-Za-z0-9_]{1,64}")

NO_STATISTICS = frozenset({"label_map"})
"""Columns written without Parquet min/max statistics (kilobytes of PNG: nothing to prune)."""


@dataclass(frozen=True, kw_only=True)
class TableTarget:
    """Where and how one table's data files of one run are written (made by the driver)."""

    table: str
    """A name in :data:`pipeline.tables.TABLES`."""
    run_id: str
    """The run."""
    data_uri: str
    """The run's data directory of the table (``OUT/<table>/data/run_id=<id>``)."""
    schema: pa.Schema
    """The table's schema as written: the contract's types, Iceberg field ids."""
    options: StorageOptions = field(default_factory=StorageOptions)
    """How to reach ``data_uri``."""


def encode_part(target: TableTarget, data: pa.Table) -> bytes:
    """Rows of the target's table (conformed) as the bytes of one Parquet data file.

    Columns the table has and the rows lack (added to the table later) are null.
    """
    columns = []
    for fld in target.schema:
        if fld.name in data.column_names:
            columns.append(data[fld.name].cast(fld.type))
        else:
            columns.append(pa.nulls(data.num_rows, fld.type))
    table = pa.Table.from_arrays(columns, schema=target.schema)
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        compression="zstd",
        write_statistics=[
            f"{f.name}.list.element" if pa.types.is_list(f.type) else f.name
            for f in target.schema
            if f.name not in NO_STATISTICS
        ],
    )
    return buf.getvalue()


class TableWriter:
    """Buffered writer of one table's rows for one run.

    Rows accumulate in memory and go out as one Parquet file per ``max_rows`` rows or
    ``max_bytes`` bytes (see the module docstring). Names are unique per file (the random part
    covers copies of one pickled writer), so any number of writers (Ray actors and tasks,
    threads) can write the same run at once; each writer itself is for one thread.

    Args:
        target: Where the files go and their schema (:meth:`RunWriter.target
            <pipeline.store.runs.RunWriter.target>`).
        writer_id: A short name in the file names (letters, digits, ``_``), e.g. the actor
            rank; default: random.
        max_rows: Rows per file.
        max_bytes: Arrow bytes per file.
    """

    def __init__(
        self,
        target: TableTarget,
        *,
        writer_id: str | None = None,
        max_rows: int = DEFAULT_MAX_ROWS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        validate_run_id(target.run_id)
        self.target = target
        self.table = target.table
        self.run_id = target.run_id
        self.writer_id = writer_id if writer_id is not None else uuid.uuid4().hex[:8]
        if not _WRITER_ID_RE.fullmatch(self.writer_id):
            raise ValueError(f"writer_id must be 1-64 letters, digits or '_': {self.writer_id!r}")
        if max_rows < 1 or max_bytes < 1:
            raise ValueError(f"max_rows and max_bytes must be >= 1: {max_rows}, {max_bytes}")
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._dir: Location | None = None
        self._chunks: list[pa.Table] = []
        self._rows = 0
        self._bytes = 0
        self._seq = 0
        self._files: list[str] = []
        self._closed = False

    @property
    def files(self) -> list[str]:
        """URIs of the files written so far."""
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
        conformed = conform(self.table, rows, run_id=self.run_id)
        if not conformed.num_rows:
            return
        self._chunks.append(conformed)
        self._rows += conformed.num_rows
        self._bytes += conformed.nbytes
        if self._rows >= self.max_rows or self._bytes >= self.max_bytes:
            self._flush(full_only=True)

    def flush(self) -> list[str]:
        """Write all buffered rows to file(s) now; returns the new files' URIs."""
        return self._flush(full_only=False)

    def _flush(self, full_only: bool) -> list[str]:
        """Write the buffer in files of at most ``max_rows`` rows / ``max_bytes`` bytes; with
        ``full_only``, keep a last, partial file's rows buffered for the next write."""
        if not self._rows:
            return []
        data = pa.concat_tables(self._chunks).combine_chunks()
        per_row = max(1.0, data.nbytes / data.num_rows)
        step = max(1, min(self.max_rows, int(self.max_bytes / per_row)))
        end = data.num_rows - data.num_rows % step if full_only else data.num_rows
        new: list[str] = []
        start = 0
        while start < end:
            cut = self._key_boundary(data, min(start + step, end))
            self._seq += 1
            new.append(self._write_part(data.slice(start, cut - start)))
            start = cut
        end = max(end, start)
        rest = data.slice(end)
        self._chunks = [rest] if rest.num_rows else []
        self._rows, self._bytes = rest.num_rows, rest.nbytes
        self._files.extend(new)
        return new

    def _key_boundary(self, data: pa.Table, cut: int) -> int:
        """``cut``, moved forward past rows sharing its key: a key's rows stay in one file
        (the commit keeps each key's rows of its latest file only)."""
        key = DEDUP_KEYS[self.table]
        if key is None:
            return data.num_rows  # the whole run is the key
        column = data[key]
        while 0 < cut < data.num_rows and column[cut] == column[cut - 1]:
            cut += 1
        return cut

    def _write_part(self, data: pa.Table) -> str:
        if self._dir is None:
            self._dir = _directory(self.target.data_uri, self.target.options)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"part-{stamp}-{self.writer_id}-{self._seq:05d}-{secrets.token_hex(3)}.parquet"
        loc = self._dir.join(name)
        write_bytes(loc, encode_part(self.target, data))
        return loc.iceberg_uri

    def close(self) -> list[str]:
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
        return {**self.__dict__, "_files": [], "_dir": None}

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        # Close (flush) only on success; after an error the caller decides (a rerun resumes).
        if exc_type is None:
            self.close()


@functools.lru_cache(maxsize=64)
def _directory(uri: str, options: StorageOptions) -> Location:
    """A data directory, resolved once per process: a Ray worker running many write tasks
    reuses its filesystem (and connections) instead of building one per file."""
    return resolve(uri, options)


def fs_path(uri: str) -> str:
    """A data file's path inside the output root's pyarrow filesystem (``file:///a`` -> ``/a``,
    ``s3://b/k`` -> ``b/k``)."""
    if uri.startswith("file://"):
        return uri[len("file://") :]
    _, sep, rest = uri.partition("://")
    return rest if sep else uri
