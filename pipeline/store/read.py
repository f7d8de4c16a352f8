"""Reading committed runs through the catalog: Arrow tables, lazy datasets, DuckDB views.

Every reader here asks the catalog for the tables' current snapshots and reads only the data
files they list, of committed runs only (runs with their ``runs`` row): a crashed attempt's
staged files, and a replaced version's files, are in no current snapshot. The files are read
lazily with ``pyarrow.dataset`` through :mod:`pipeline.storage` filesystems, so DuckDB scans
them as Arrow (no DuckDB extension is downloaded: ``fcnpipe query`` works offline), and
``run_id`` comes back as a string column.

Any other engine reads the same tables through the same catalog
(``fcnpipe tables info OUT`` prints how to connect), e.g.::

    from pyiceberg.catalog import load_catalog
    catalog = load_catalog("fcnpipe", **props)
    polars.scan_iceberg(catalog.load_table("fcnpipe.predictions"))
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.storage import Location, StorageOptions, resolve
from pipeline.store.catalog import TableStore, run_filter
from pipeline.store.files import fs_path
from pipeline.tables import (
    PARTITION_COLUMN,
    TABLES,
    RunExistsError,
    RunNotCommittedError,
    table_schema,
    validate_run_id,
)

if TYPE_CHECKING:
    import duckdb

__all__ = [
    "PREDICTIONS_LATEST_SQL",
    "TableReader",
    "check_not_committed",
    "committed_runs",
    "duckdb_connection",
    "is_committed",
    "read_table",
    "table_dataset",
]


PREDICTIONS_LATEST_SQL = """
WITH latest_run AS (  -- each stream's newest committed run
    SELECT stream, run_id FROM runs
    WHERE kind = 'segment' AND stream IS NOT NULL
    QUALIFY row_number() OVER (PARTITION BY stream ORDER BY finished_at DESC, run_id DESC) = 1
),
listed AS (  -- the objects that run listed, in their version then
    SELECT l.stream, i.image_uri, i.image_version FROM inputs i JOIN latest_run l USING (run_id)
),
stream_predictions AS (
    SELECT r.stream, r.finished_at AS run_finished_at, p.*
    FROM predictions p JOIN runs r USING (run_id)
    WHERE r.stream IS NOT NULL
)
SELECT s.* FROM stream_predictions s
JOIN listed USING (stream, image_uri, image_version)
QUALIFY row_number() OVER (
    PARTITION BY s.stream, s.image_uri ORDER BY s.run_finished_at DESC, s.run_id DESC
) = 1
"""
"""The ``predictions_latest`` view: per stream (``segment --stream``), one row per object its
newest run listed, the prediction of the object's version then (from whichever of the stream's
runs made it; the newest such run where a model change made several). Objects deleted since
are in no listing of the newest run, so they leave the view (their rows stay in
``predictions``); an object whose current version failed is in ``errors``, not here. Columns:
``stream``, ``run_finished_at``, then the ``predictions`` columns. Plain SQL over the tables: any
engine with ``QUALIFY`` (DuckDB, Snowflake, Databricks) runs it as is."""


class TableReader:
    """The committed runs of one output root, for reading (one catalog connection).

    Args:
        out_uri: The output root.
        options: Storage options for a string URI (and the catalog).

    Raises:
        OldTableFormatError: The root is in the marker format.
    """

    def __init__(self, out_uri: str | Location, options: StorageOptions | None = None) -> None:
        self.root = resolve(out_uri, options)
        self.store = TableStore.open(self.root)
        self.run_ids: list[str] = self.store.committed_runs() if self.store else []
        """Ids of the committed runs, sorted (as of opening)."""

    def is_committed(self, run_id: str) -> bool:
        """Whether a run is committed (as of opening)."""
        return run_id in self.run_ids

    def _runs(self, run_ids: Iterable[str] | None) -> list[str]:
        if run_ids is None:
            return list(self.run_ids)
        if isinstance(run_ids, str):  # one id, not its characters
            run_ids = [run_ids]
        ids = [validate_run_id(r) for r in dict.fromkeys(run_ids)]
        for run_id in ids:
            if run_id not in self.run_ids:
                raise RunNotCommittedError(f"run {run_id!r} is not committed under {self.root}")
        return ids

    def dataset(self, table: str, run_ids: Iterable[str] | None = None) -> ds.FileSystemDataset:
        """A lazy ``pyarrow.dataset`` over a table's committed data files.

        Args:
            table: A name in :data:`pipeline.tables.TABLES`.
            run_ids: Only these runs (each must be committed); None: every committed run.

        Raises:
            RunNotCommittedError: A requested run is not committed.
        """
        schema = table_schema(table)
        ids = self._runs(run_ids)
        tbl = self.store.table(table) if self.store is not None else None
        fs, _ = self.root.pyarrow_fs()
        paths: list[str] = []
        partitions: list[pc.Expression] = []
        if tbl is not None and tbl.current_snapshot() is not None and ids:
            row_filter = "True" if len(ids) == len(self.run_ids) else run_filter(ids)
            wanted = set(ids)
            for task in tbl.scan(row_filter=row_filter).plan_files():
                run_id = str(task.file.partition[0])
                if run_id not in wanted:  # a run published table by table, cut short
                    continue
                paths.append(fs_path(task.file.file_path))
                # Lets a filter on run_id skip whole files.
                partitions.append(pc.field(PARTITION_COLUMN) == pa.scalar(run_id, pa.string()))
        return ds.FileSystemDataset.from_paths(
            paths,
            schema=schema,
            format=ds.ParquetFileFormat(),
            filesystem=fs,
            partitions=partitions,
        )

    def read(
        self,
        table: str,
        run_ids: Iterable[str] | None = None,
        *,
        columns: Sequence[str] | None = None,
    ) -> pa.Table:
        """A table's rows from committed runs only, ``run_id`` included as a string column.

        Args:
            table: A name in :data:`pipeline.tables.TABLES`.
            run_ids: Only these runs (each must be committed); None: every committed run.
            columns: Only these columns; None: all, in schema order.

        Raises:
            RunNotCommittedError: A requested run is not committed.
        """
        dataset = self.dataset(table, run_ids)
        return dataset.to_table(columns=list(columns) if columns is not None else None)

    def duckdb(self, run_ids: Iterable[str] | None = None) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with one view per table over committed runs only.

        Views ``predictions``, ``class_metrics``, ``runs``, ``errors``, ``training`` and
        ``inputs`` scan the committed data files lazily; a table without committed rows is an
        empty view with its columns. ``predictions_latest`` (:data:`PREDICTIONS_LATEST_SQL`) is
        each stream's current prediction per object.

        Args:
            run_ids: Only these runs (each must be committed); None: every committed run.

        Raises:
            RunNotCommittedError: A requested run is not committed.
        """
        import duckdb  # imported here: Ray workers writing tables never need it

        ids = self._runs(run_ids)
        con = duckdb.connect()
        for table in TABLES:
            dataset = self.dataset(table, ids)
            # An Arrow table, not an empty dataset, so DuckDB sees the columns without a scan.
            con.register(table, dataset if dataset.files else TABLES[table].empty_table())
        con.execute(f"CREATE VIEW predictions_latest AS {PREDICTIONS_LATEST_SQL}")
        return con


def committed_runs(out_uri: str | Location, options: StorageOptions | None = None) -> list[str]:
    """The ids of all committed runs, sorted.

    Args:
        out_uri: The output root.
        options: Storage options for a string URI.
    """
    return TableReader(out_uri, options).run_ids


def is_committed(
    out_uri: str | Location, run_id: str, options: StorageOptions | None = None
) -> bool:
    """Whether a run is committed (its ``runs`` row is in the current snapshot).

    Args:
        out_uri: The output root.
        run_id: The run.
        options: Storage options for a string URI.
    """
    store = TableStore.open(resolve(out_uri, options))
    return store is not None and store.is_committed(validate_run_id(run_id))


def check_not_committed(
    out_uri: str | Location, run_id: str, overwrite: bool, options: StorageOptions | None = None
) -> None:
    """Refuse a committed run unless it is to be overwritten (jobs call it before any work).

    Raises:
        RunExistsError: The run is committed and ``overwrite`` is False.
        OldTableFormatError: The root is in the marker format.
    """
    root = resolve(out_uri, options)
    store = TableStore.open(root)  # also refuses a root in the marker format
    if not overwrite and store is not None and store.is_committed(run_id):
        raise RunExistsError(
            f"run {run_id!r} is already committed under {root.uri}; pass "
            "overwrite=True (--overwrite) to replace it, or use a new run id"
        )


def table_dataset(
    out_uri: str | Location,
    table: str,
    run_ids: Iterable[str] | None = None,
    options: StorageOptions | None = None,
) -> ds.Dataset:
    """A lazy ``pyarrow.dataset`` over a table's committed data files (see
    :meth:`TableReader.dataset`)."""
    return TableReader(out_uri, options).dataset(table, run_ids)


def read_table(
    out_uri: str | Location,
    table: str,
    run_ids: Iterable[str] | None = None,
    *,
    columns: Sequence[str] | None = None,
    options: StorageOptions | None = None,
) -> pa.Table:
    """A table's rows from committed runs only (see :meth:`TableReader.read`).

    Raises:
        RunNotCommittedError: A requested run is not committed.
    """
    return TableReader(out_uri, options).read(table, run_ids, columns=columns)


def duckdb_connection(
    out_uri: str | Location,
    run_ids: Iterable[str] | None = None,
    options: StorageOptions | None = None,
) -> duckdb.DuckDBPyConnection:
    """DuckDB views over the committed runs of an output root (see :meth:`TableReader.duckdb`).

    Raises:
        RunNotCommittedError: A requested run is not committed.
    """
    return TableReader(out_uri, options).duckdb(run_ids)
