"""The driver's side of a run: start (refuse, overwrite or resume), hand out writers, commit.

Protocol (one attempt of a run at a time; any number of writers inside an attempt):

1. The driver opens a :class:`RunWriter`. A committed run (one with its ``runs`` row in the
   tables' current snapshot) is refused unless ``overwrite=True``. With ``overwrite`` the
   committed version stays visible until the new one commits, and data files left by crashed
   attempts are deleted: the run starts empty. Without it, data files of a crashed attempt
   (staged in the run's data directories, in no snapshot) are kept, truncated ones and
   temporary leftovers are deleted, and :meth:`RunWriter.existing_ids` tells the job what is
   already done: the run *resumes*.
2. Rows go through :class:`~pipeline.store.files.TableWriter` objects (one per Ray worker or
   thread; the driver has its own through :meth:`RunWriter.write`), each file written whole.
   Workers get :meth:`RunWriter.target`: a directory and a schema, no catalog.
3. After every writer is closed, :meth:`RunWriter.commit` lists the run's data directories
   (files of every attempt), reads each new file's footer and key column, settles duplicates
   (below), and publishes the run: one snapshot per table, all tables at once on a SQL
   catalog (:meth:`pipeline.store.catalog.TableStore.commit`). A fast append adds the files; an
   overwrite removes the replaced version's files and adds the new ones in the same snapshot.
   Readers of any engine see the run from that snapshot on, and nothing of it before.

Dedup rule (exactly one copy of each key after a resume or a retried task): each table has a
key (:data:`pipeline.tables.DEDUP_KEYS`): ``image_id`` for ``predictions`` and
``class_metrics``, ``image_uri`` for ``errors``, ``epoch`` for ``training``, and the whole run
for ``runs``. At commit, for each key value only the rows of the *latest* file holding it are
kept (files order by their name, which starts with the UTC time of the flush); a file losing
some rows is rewritten without them, one losing all is left out, and the files left out are
deleted after the commit. So a resumed training run that redoes epoch 4 keeps the new epoch-4
row, and a ``runs`` row written by a crashed attempt gives way to the final one.

Example::

    run = RunWriter("s3://bucket/out", new_run_id("segment"), "segment")
    done = run.existing_ids("predictions")           # resume: skip these
    target = run.target("predictions")               # send to Ray workers
    writer = TableWriter(target); writer.write([{"image_id": "a", ...}]); writer.close()
    run.write("runs", [{...}])
    run.commit(extra={"model_uri": "..."})
"""

from __future__ import annotations

import json
import logging
import posixpath
import secrets
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyiceberg.io.pyarrow import (
    compute_statistics_plan,
    data_file_statistics_from_parquet_metadata,
    parquet_path_to_id_mapping,
)
from pyiceberg.manifest import DataFile, DataFileContent, FileFormat
from pyiceberg.table import Table

from pipeline.storage import FileInfo, Location, StorageOptions, delete, list_files, resolve
from pipeline.store.catalog import TableChange, TableStore, table_arrow_schema
from pipeline.store.files import PART_RE, TableTarget, TableWriter, fs_path
from pipeline.tables import (
    DEDUP_KEYS,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ROWS,
    PARTITION_COLUMN,
    TABLES,
    Rows,
    RunExistsError,
    RunKind,
    SchemaError,
    TableError,
    check_kind,
    table_schema,
    validate_run_id,
)

__all__ = ["CommitResult", "RunWriter"]

logger = logging.getLogger(__name__)

_SCAN_THREADS = 8  # footers read at once (S3 latency, not CPU)


@dataclass(frozen=True, kw_only=True)
class CommitResult:
    """What a run's commit published."""

    run_id: str
    """The run."""
    kind: str
    """``train`` or ``segment``."""
    finished_at: datetime
    """When the run finished (UTC)."""
    rows: dict[str, int]
    """Rows the run has in each table it has rows in."""
    files: dict[str, tuple[str, ...]]
    """Data files of the run in each table (Iceberg URIs)."""
    snapshots: dict[str, int]
    """The snapshot each changed table got."""
    extra: dict[str, Any] = field(default_factory=dict)
    """What the job added (e.g. the model URI), also in the snapshots' summaries."""


@dataclass
class _Part:
    """A data file of the run: staged (no snapshot has it) or in the current snapshot."""

    uri: str
    """Its Iceberg URI."""
    metadata: pq.FileMetaData
    """Its footer."""
    size: int
    """Bytes."""
    committed: DataFile | None = None
    """Its entry in the current snapshot; None while staged."""
    columns: dict[str, pa.Array] = field(default_factory=dict)
    """Columns read so far (keys)."""

    @property
    def name(self) -> str:
        return posixpath.basename(self.uri)

    @property
    def rows(self) -> int:
        return int(self.metadata.num_rows)


class RunWriter:
    """Driver side of one run: start (refuse, overwrite or resume), write, commit.

    See the module docstring for the protocol. Only one attempt of a run may be running at a
    time.

    Args:
        out_uri: The output root.
        run_id: The run (see :func:`pipeline.tables.validate_run_id`).
        kind: ``train`` or ``segment``.
        overwrite: Replace a committed run (or start a crashed one afresh).
        max_rows: Rows per file for the writers made here.
        max_bytes: Arrow bytes per file for the writers made here.
        options: Storage options for a string URI (and the catalog).
        store: The tables, already opened (``out_uri`` is then ignored).

    Raises:
        RunExistsError: The run is committed and ``overwrite`` is False.
        OldTableFormatError: The root is in the marker format.
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
        store: TableStore | None = None,
    ) -> None:
        self.run_id = validate_run_id(run_id)
        check_kind(kind)
        self.kind = kind
        self.overwrite = overwrite
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._root = resolve(out_uri, options) if store is None else store.root
        if store is None:
            store = TableStore.open(self._root, create=True)
            assert store is not None  # created
        self.store = store
        if store.is_committed(run_id) and not overwrite:
            raise RunExistsError(
                f"run {run_id!r} is already committed under {self._root.uri}; pass "
                "overwrite=True (--overwrite) to replace it, or use a new run id"
            )
        self._targets = {
            table: TableTarget(
                table=table,
                run_id=run_id,
                data_uri=store.data_uri(table, run_id),
                schema=table_arrow_schema(store.require(table)),
                options=self._root.options,
            )
            for table in TABLES
        }
        self._writers: dict[str, TableWriter] = {}
        self._parts: dict[str, _Part] = {}
        self._listed: dict[str, list[FileInfo]] = {}
        self._committed = False
        self._pafs: pafs.FileSystem | None = None
        # Files of this run that snapshots still hold (versions replaced by --overwrite among
        # them): never mistaken for staged files of a crashed attempt.
        self._history = {table: store.run_history(table, run_id) for table in TABLES}
        # Files of this uncommitted run in the current snapshot: only where a catalog that
        # publishes table by table was cut short (a SQL catalog publishes all or nothing).
        self._partial = not overwrite and not store.info.is_sql
        self._current: dict[str, list[DataFile]] = {
            table: (store.run_files(table, run_id) if self._partial else []) for table in TABLES
        }
        self.resumed_files: dict[str, list[str]] = {}
        """Per table, the files of earlier attempts this one goes on from."""
        self._list(list(TABLES))
        for table in TABLES:
            staged = self._staged(table, clean=True)
            if overwrite:
                for part in staged:
                    logger.info("run %s: deleting %s of an earlier attempt", run_id, part.uri)
                    delete(resolve(part.uri, self._root.options))
                    del self._parts[part.uri]
                continue
            kept = [p.uri for p in self._candidates(table)]
            if kept:
                self.resumed_files[table] = kept
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

    def target(self, table: str) -> TableTarget:
        """Where a worker writes this run's data files of a table (it pickles, no catalog).

        Args:
            table: A name in :data:`pipeline.tables.TABLES`.
        """
        table_schema(table)
        return self._targets[table]

    def writer(self, table: str, *, writer_id: str | None = None) -> TableWriter:
        """A new buffered writer of this run for one actor, task or thread.

        Args:
            table: A name in :data:`pipeline.tables.TABLES`.
            writer_id: A short name in the file names (e.g. the actor rank); default random.
        """
        return TableWriter(
            self.target(table),
            writer_id=writer_id,
            max_rows=self.max_rows,
            max_bytes=self.max_bytes,
        )

    def write(self, table: str, rows: Rows) -> None:
        """Buffer rows in the driver's own writer for a table (not thread-safe).

        Args:
            table: A name in :data:`pipeline.tables.TABLES`.
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
        """The key values already written in this run (files of all attempts, and the driver's
        buffer).

        After a crash, this is what the job can skip: e.g. ``existing_ids("predictions")`` for
        the segmentation job, ``existing_ids("training", key="epoch")`` for training.

        Args:
            table: A name in :data:`pipeline.tables.TABLES`.
            key: A column of the table.
        """
        schema = table_schema(table)
        if key == PARTITION_COLUMN or schema.get_field_index(key) < 0:
            raise SchemaError(table, key, "not a column of the table's files")
        self._list([table])
        parts = self._candidates(table)
        self._read_column(parts, key)
        arrays = [p.columns[key] for p in parts]
        if table in self._writers:
            arrays.extend(c.column(key).combine_chunks() for c in self._writers[table]._chunks)
        if not arrays:
            return set()
        return set(pc.unique(pa.chunked_array(arrays, type=schema.field(key).type)).to_pylist())

    def iter_written(self, table: str, columns: Sequence[str]) -> Iterator[pa.Table]:
        """The rows written so far in this run (all attempts), one file's worth at a time.

        Flushes the driver's buffer first. Rows a later file supersedes (the dedup rule) are
        left out, so this is what :meth:`commit` will publish, read in bounded memory: e.g. to
        sum a run's per-class counts across attempts.

        Args:
            table: A name in :data:`pipeline.tables.TABLES`.
            columns: Columns to read.
        """
        self._check_open()
        if table in self._writers:
            self._writers[table].flush()
        self._list([table])
        key = DEDUP_KEYS[table]
        parts = [p for p in self._candidates(table) if p.rows]
        if key is None:  # the whole run is the key: only the latest file counts
            parts = parts[-1:]
        wanted = list(columns) if key is None or key in columns else [*columns, key]
        owned = None
        if key is not None:
            self._read_column(parts, key)
            owned = _owned_keys(parts, key)
        for i, part in enumerate(parts):
            data = self._read(part, wanted)
            if owned is not None and key is not None:
                # Keep the rows whose key this file is the latest to hold.
                data = data.filter(pc.is_in(data[key], value_set=owned[i]))
            yield data.select(list(columns))

    def commit(
        self, extra: Mapping[str, Any] | None = None, *, finished_at: datetime | None = None
    ) -> CommitResult:
        """Flush, settle the run's files (dedup), and publish them in one commit.

        Every :class:`TableWriter` of the run must be closed before (their files are found by
        listing the run's data directories, which also picks up files of earlier attempts).

        Args:
            extra: JSON-serializable facts kept in the snapshots' summaries (never
                credentials).
            finished_at: When the run finished (tz-aware); default now.

        Raises:
            RunExistsError: Someone committed this run meanwhile.
            TableError: The run has no ``runs`` row (a run commits with its summary).
        """
        self._check_open()
        for w in self._writers.values():
            w.close()
        finished = finished_at or datetime.now(UTC)
        if finished.tzinfo is None:
            raise ValueError("finished_at must be tz-aware (datetime.now(UTC))")
        extra_doc = json.loads(json.dumps(dict(extra or {}), allow_nan=False))
        self._list(list(TABLES))
        kept: dict[str, list[_Part]] = {}
        superseded: list[_Part] = []
        for table in TABLES:
            kept[table], dropped = self._settle(table)
            superseded.extend(dropped)
        if not sum(p.rows for p in kept["runs"]):
            raise TableError(
                f"run {self.run_id!r} has no row in the runs table: a run commits with its summary"
            )
        added = {
            table: [self._data_file(table, p) for p in parts if p.committed is None]
            for table, parts in kept.items()
        }

        def plan(store: TableStore) -> list[TableChange]:
            if not self.overwrite and store.is_committed(self.run_id):
                raise RunExistsError(f"run {self.run_id!r} was committed by someone else meanwhile")
            changes = []
            for table in TABLES:
                keep = {p.uri for p in kept[table]}
                replacing = self.overwrite or self._partial
                current = store.run_files(table, self.run_id) if replacing else []
                have = {f.file_path for f in current}
                changes.append(
                    TableChange(
                        table=table,
                        add=[f for f in added[table] if f.file_path not in have],
                        delete=[f for f in current if f.file_path not in keep],
                    )
                )
            return changes

        properties = {
            "fcnpipe.kind": self.kind,
            "fcnpipe.finished-at": finished.astimezone(UTC).isoformat(),
        }
        if extra_doc:
            properties["fcnpipe.extra"] = json.dumps(extra_doc, sort_keys=True)
        snapshots = self.store.commit(self.run_id, plan, properties)
        self._committed = True
        # After the commit: a crash before it leaves only staged files no snapshot has.
        for part in superseded:
            if part.committed is None:
                delete(resolve(part.uri, self._root.options))
        result = CommitResult(
            run_id=self.run_id,
            kind=self.kind,
            finished_at=finished.astimezone(UTC),
            rows={t: sum(p.rows for p in parts) for t, parts in kept.items() if parts},
            files={t: tuple(p.uri for p in parts) for t, parts in kept.items() if parts},
            snapshots=snapshots,
            extra=extra_doc,
        )
        logger.info(
            "run %s committed: %s",
            self.run_id,
            ", ".join(f"{n} {t}" for t, n in result.rows.items()) or "no rows",
        )
        return result

    # -- internals

    def _check_open(self) -> None:
        if self._committed:
            raise TableError(f"run {self.run_id!r} is already committed by this writer")

    def _fs(self) -> pafs.FileSystem:
        """The pyarrow filesystem of the output root, built once."""
        if self._pafs is None:
            self._pafs = self._root.pyarrow_fs()[0]
        return self._pafs

    def _list(self, tables: Sequence[str]) -> None:
        """List the run's data directories of these tables (in parallel: S3 latency)."""

        def list_one(table: str) -> list[FileInfo]:
            return list_files(self._root.join(table, "data", f"{PARTITION_COLUMN}={self.run_id}"))

        with ThreadPoolExecutor(len(tables)) as pool:
            for table, found in zip(tables, pool.map(list_one, tables), strict=True):
                self._listed[table] = found

    def _candidates(self, table: str) -> list[_Part]:
        """The run's files of a table that a commit now would consider, oldest first: those of
        the current snapshot (a run published table by table and cut short), then the staged
        ones."""
        staged = self._staged(table, clean=False)
        for data_file in self._current[table]:
            if data_file.file_path not in self._parts:
                self._parts[data_file.file_path] = _Part(
                    uri=data_file.file_path,
                    metadata=self._footer(data_file.file_path),
                    size=data_file.file_size_in_bytes,
                    committed=data_file,
                )
        current = [self._parts[f.file_path] for f in self._current[table]]
        return sorted([*current, *staged], key=lambda p: p.name)

    def _staged(self, table: str, *, clean: bool) -> list[_Part]:
        """The run's readable data files of a table that no snapshot holds, oldest first.

        Unreadable files (a truncated write) and other debris are skipped with a warning, and
        deleted when ``clean``.
        """
        directory = self._root.join(table, "data", f"{PARTITION_COLUMN}={self.run_id}")
        known = self._history[table] | {f.file_path for f in self._current[table]}
        new: list[tuple[str, int]] = []
        staged: list[_Part] = []
        for info in self._listed[table]:
            uri = directory.join(info.relpath).iceberg_uri
            if uri in known:
                continue
            if "/" in info.relpath or not PART_RE.fullmatch(info.relpath):
                self._bad(uri, "not a data file", clean)
                continue
            if uri in self._parts:
                staged.append(self._parts[uri])
            else:
                new.append((uri, info.size))
        with ThreadPoolExecutor(_SCAN_THREADS) as pool:
            footers = list(pool.map(lambda item: self._try_footer(item[0]), new))
        expected = self._targets[table].schema.names
        for (uri, size), footer in zip(new, footers, strict=True):
            if footer is None:
                self._bad(uri, "unreadable (truncated?)", clean)
                continue
            names = footer.schema.to_arrow_schema().names
            if any(name not in expected for name in names):
                raise TableError(
                    f"{uri}: columns {names} are not those of {table!r} ({expected}); rerun "
                    "with overwrite=True"
                )
            part = _Part(uri=uri, metadata=footer, size=size)
            self._parts[uri] = part
            staged.append(part)
        return sorted(staged, key=lambda p: p.name)

    def _bad(self, uri: str, why: str, clean: bool) -> None:
        if clean:
            logger.warning("deleting %s: %s, left by an earlier attempt", uri, why)
            delete(resolve(uri, self._root.options))
        else:
            logger.warning("ignoring %s: %s", uri, why)

    def _footer(self, uri: str) -> pq.FileMetaData:
        with self._fs().open_input_file(fs_path(uri)) as f:
            return pq.ParquetFile(f).metadata

    def _try_footer(self, uri: str) -> pq.FileMetaData | None:
        try:
            return self._footer(uri)
        except (pa.ArrowInvalid, OSError) as exc:  # truncated, not Parquet, or gone
            if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
                raise
            return None

    def _read(self, part: _Part, columns: Sequence[str]) -> pa.Table:
        with self._fs().open_input_file(fs_path(part.uri)) as f:
            return pq.ParquetFile(f).read(columns=list(columns))

    def _read_column(self, parts: Sequence[_Part], column: str) -> None:
        """Read (once) one column of each part, in parallel."""
        todo = [p for p in parts if column not in p.columns]

        def read(part: _Part) -> None:
            part.columns[column] = self._read(part, [column]).column(0).combine_chunks()

        with ThreadPoolExecutor(_SCAN_THREADS) as pool:
            list(pool.map(read, todo))

    def _settle(self, table: str) -> tuple[list[_Part], list[_Part]]:
        """Apply the dedup rule to a table's files: (files to publish, files superseded)."""
        key = DEDUP_KEYS[table]
        parts = [p for p in self._candidates(table) if p.rows]
        if not parts:
            return [], []
        if key is None:  # the whole run is one key: the latest file wins
            return [parts[-1]], parts[:-1]
        self._read_column(parts, key)
        owned = _owned_keys(parts, key)
        kept: list[_Part] = []
        dropped: list[_Part] = []
        for i, part in enumerate(parts):
            mine = pc.sum(pc.is_in(part.columns[key], value_set=owned[i])).as_py() or 0
            if mine == part.rows:
                kept.append(part)
                continue
            dropped.append(part)
            if not mine:
                continue
            data = self._read(part, self._targets[table].schema.names)
            rest = data.filter(pc.is_in(data[key], value_set=owned[i]))
            logger.info(
                "run %s: %d %s row(s) of %s superseded by later files",
                self.run_id,
                data.num_rows - rest.num_rows,
                table,
                part.uri,
            )
            writer = TableWriter(self._targets[table], writer_id="commit", max_rows=2**62)
            writer.write(rest)
            kept.extend(self._part_of(uri) for uri in writer.close())
        return sorted(kept, key=lambda p: p.name), dropped

    def _part_of(self, uri: str) -> _Part:
        loc = resolve(uri, self._root.options)
        part = _Part(uri=uri, metadata=self._footer(uri), size=int(loc.fs.size(loc.path)))
        self._parts[uri] = part
        return part

    def _data_file(self, table: str, part: _Part) -> DataFile:
        """The Iceberg entry of a staged file, from its footer (no data read)."""
        tbl: Table = self.store.require(table)
        schema = tbl.schema()
        statistics = data_file_statistics_from_parquet_metadata(
            parquet_metadata=part.metadata,
            stats_columns=compute_statistics_plan(schema, tbl.metadata.properties),
            parquet_column_mapping=parquet_path_to_id_mapping(schema),
        )
        return DataFile.from_args(
            content=DataFileContent.DATA,
            file_path=part.uri,
            file_format=FileFormat.PARQUET,
            partition=statistics.partition(tbl.spec(), schema),
            file_size_in_bytes=part.size,
            sort_order_id=None,
            spec_id=tbl.metadata.default_spec_id,
            equality_ids=None,
            key_metadata=None,
            **statistics.to_serialized_dict(),
        )


def _owned_keys(parts: Sequence[_Part], key: str) -> list[pa.Array]:
    """Per file, the keys whose latest file it is (one group-by over all keys)."""
    if not parts:
        return []
    owners = pa.table(
        {
            "k": pa.chunked_array([p.columns[key] for p in parts]),
            "f": pa.chunked_array(
                [pa.array([i] * len(p.columns[key]), pa.int32()) for i, p in enumerate(parts)]
            ),
        }
    )
    latest = owners.group_by("k").aggregate([("f", "max")]).sort_by("f_max")
    bounds = np.searchsorted(latest["f_max"].to_numpy(), np.arange(len(parts) + 1))
    keys = latest["k"].combine_chunks()
    return [keys.slice(bounds[i], bounds[i + 1] - bounds[i]) for i in range(len(parts))]
