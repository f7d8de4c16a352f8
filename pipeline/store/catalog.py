"""The Iceberg catalog of an output root: where it is, how to connect, the tables in it.

Which catalog (:func:`catalog_info`):

- ``StorageOptions.catalog`` (the CLI's ``--catalog``), else ``FCNPIPE_CATALOG``: a REST
  (``https://host/path``), Hive (``thrift://host:9083``), Glue (``glue://``) or SQL
  (``sqlite:////abs/catalog.db``, ``postgresql://host/db``) catalog URI, or the name of a
  catalog in the pyiceberg configuration (``.pyiceberg.yaml``, ``PYICEBERG_CATALOG__<NAME>__*``).
  Its query string holds further non-secret properties (``?warehouse=w``) and the namespace
  of the tables (``namespace=results``; default ``fcnpipe``). Credentials never go into it:
  pyiceberg reads them from ``PYICEBERG_CATALOG__FCNPIPE__CREDENTIAL`` / ``__TOKEN`` (or the
  named catalog's configuration), as the S3 ones come from the AWS variables.
- Otherwise the embedded catalog: pyiceberg's SQL catalog on a SQLite file. For a local output
  root it is ``OUT/_catalog/catalog.db``, inside the root, so the root moves and is backed up
  as one directory. SQLite needs a local file system (locks, in-place writes), which an
  ``s3://`` root is not: its catalog lives beside it on this machine, at
  ``${XDG_DATA_HOME:-~/.local/share}/fcnpipe/catalogs/s3/<endpoint host>/<bucket>/<key>/
  catalog.db``. So the embedded catalog of an ``s3://`` root serves the jobs and readers of one
  machine; a cluster whose drivers and readers run on different machines names a shared
  catalog with ``FCNPIPE_CATALOG``.

The warehouse is the output root: each table's location is ``OUT/<table>``, its data files
``OUT/<table>/data/run_id=<id>/part-*.parquet`` and its metadata ``OUT/<table>/metadata/``.
Tables are created on first write (format version 2, identity partition on ``run_id``,
zstd); a column the contract gained since is added to an existing table then.

Commits (:meth:`TableStore.commit`): one snapshot per table the run touches, each carrying
the run id in its summary (``fcnpipe.run-id``). On a SQL catalog (the embedded one included)
every table's snapshot of a run is published in one SQL transaction: readers see all of the
run or none of it. Other catalogs publish table by table (``runs`` last); a crash between two
of them leaves a run that readers of ``runs`` do not see, and its rerun completes it.
Concurrent commits of other runs are retried optimistically.

Only drivers and readers open a catalog: Ray workers write data files to the locations the
driver hands them and never see the catalog or its credentials.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import pyarrow as pa
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.catalog.sql import IcebergTables, SqlCatalog
from pyiceberg.exceptions import (
    CommitFailedException,
    NoSuchNamespaceError,
    NoSuchTableError,
    TableAlreadyExistsError,
)
from pyiceberg.io.pyarrow import pyarrow_to_schema, schema_to_pyarrow
from pyiceberg.manifest import DataFile, ManifestEntryStatus
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.table import CommitTableResponse, Table
from pyiceberg.transforms import IdentityTransform
from sqlalchemy import update
from sqlalchemy.orm import Session

from pipeline.errors import ConfigError, InputError, ServiceError
from pipeline.storage import Location, exists
from pipeline.tables import PARTITION_COLUMN, TABLES, TableError, table_schema, validate_run_id

logger = logging.getLogger(__name__)

__all__ = [
    "CATALOG_NAME",
    "RUN_PROPERTY",
    "CatalogInfo",
    "OldTableFormatError",
    "TableChange",
    "TableStore",
    "arrow_schema",
    "catalog_info",
]

CATALOG_NAME = "fcnpipe"
"""The catalog's name for pyiceberg: its configuration and credentials are looked up under it
(``PYICEBERG_CATALOG__FCNPIPE__*``) unless ``--catalog`` names another."""

DEFAULT_NAMESPACE = "fcnpipe"
"""Namespace of the tables unless the catalog URI says ``namespace=...``."""

EMBEDDED_DIR = "_catalog"
"""Directory of a local output root holding its embedded catalog."""

EMBEDDED_FILE = "catalog.db"
"""The embedded catalog's SQLite file."""

OLD_MARKER_DIR = "_committed"
"""Where the marker format (before Iceberg) kept one ``<run_id>.json`` per committed run."""

RUN_PROPERTY = "fcnpipe.run-id"
"""Snapshot summary property naming the run a snapshot commits."""

TABLE_PROPERTIES = {
    "format-version": "2",
    "write.parquet.compression-codec": "zstd",
    # Label maps are kilobytes of PNG: min/max bounds in the manifests would be noise.
    "write.metadata.metrics.column.label_map": "none",
    "commit.retry.num-retries": "10",
    # Each commit writes a new metadata file; keep the last 20, delete older ones then.
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "20",
}
"""Properties of the tables fcnpipe creates."""

COMMIT_ORDER = ("training", "errors", "class_metrics", "predictions", "inputs", "runs")
"""Order of the per-table commits where the catalog cannot publish them at once: ``runs``, which
says a run is committed, last."""

_COMMIT_ATTEMPTS = 12
_SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")


class OldTableFormatError(TableError, InputError):
    """An output root still in the marker format (``OUT/_committed``)."""


# ----------------------------------------------------------------------------- which catalog


@dataclass(frozen=True)
class CatalogInfo:
    """How to connect to an output root's catalog: ``load_catalog(name, **properties)``."""

    name: str
    """The catalog's name for pyiceberg (its configuration and credentials are under it)."""
    properties: dict[str, str]
    """Connection properties, never credentials."""
    namespace: str
    """Namespace of the tables."""
    embedded: str | None = None
    """The SQLite file of the embedded catalog; None for a catalog named by URI or name."""

    def identifier(self, table: str) -> str:
        """A table's identifier, ``<namespace>.<table>``."""
        return f"{self.namespace}.{table}"

    @property
    def identifiers(self) -> dict[str, str]:
        """Every table's identifier, by table name."""
        return {table: self.identifier(table) for table in TABLES}

    @property
    def is_sql(self) -> bool:
        """Whether it is a SQL catalog (commits of several tables publish at once)."""
        return self.properties.get("type") == "sql"


def catalog_info(root: Location) -> CatalogInfo:
    """Where the catalog of an output root is and how to connect to it.

    Args:
        root: The output root (its options carry ``catalog``, else ``FCNPIPE_CATALOG``).

    Raises:
        ConfigError: A catalog URI of an unknown kind.
    """
    spec = root.options.catalog or os.environ.get("FCNPIPE_CATALOG") or None
    io_props = root.iceberg_properties()
    if spec is None:
        path = embedded_path(root)
        return CatalogInfo(
            name=CATALOG_NAME,
            properties={
                "type": "sql",
                "uri": f"sqlite:///{path}",
                "warehouse": root.iceberg_uri,
                **io_props,
            },
            namespace=DEFAULT_NAMESPACE,
            embedded=str(path),
        )
    if "://" not in spec and ":" not in spec:
        if spec == "glue":
            return CatalogInfo(CATALOG_NAME, {"type": "glue", **io_props}, DEFAULT_NAMESPACE)
        # A catalog of the user's pyiceberg configuration: all of its properties come from there.
        return CatalogInfo(name=spec, properties={}, namespace=DEFAULT_NAMESPACE)
    parts = urlsplit(spec)
    scheme = parts.scheme.lower().split("+", 1)[0]
    extra = dict(parse_qsl(parts.query))
    namespace = extra.pop("namespace", DEFAULT_NAMESPACE)
    plain = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    if scheme in ("http", "https"):
        props = {"type": "rest", "uri": plain}
    elif scheme == "thrift":
        props = {"type": "hive", "uri": plain}
    elif scheme == "glue":
        props = {"type": "glue"}
    elif scheme in _SQL_SCHEMES:
        props = {"type": "sql", "uri": plain, "warehouse": root.iceberg_uri}
    else:
        raise ConfigError(
            f"--catalog / FCNPIPE_CATALOG: unknown catalog kind {parts.scheme!r}; expected "
            "https:// (REST), thrift:// (Hive), glue:// (Glue), sqlite:/// or postgresql:// (SQL), "
            "or the name of a catalog in the pyiceberg configuration"
        )
    return CatalogInfo(
        name=CATALOG_NAME,
        properties={**props, **io_props, **extra},
        namespace=namespace,
    )


def embedded_path(root: Location) -> Path:
    """The SQLite file of an output root's embedded catalog (see the module docstring)."""
    if root.is_local:
        return Path(root.path) / EMBEDDED_DIR / EMBEDDED_FILE
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    endpoint = root.options.s3_endpoint if root.scheme == "s3" else None
    host = urlsplit(endpoint).netloc.replace(":", "_") if endpoint else "default"
    key = root.path.strip("/").split("/")
    return Path(data_home, "fcnpipe", "catalogs", root.scheme, host, *key, EMBEDDED_FILE)


# ----------------------------------------------------------------------------- schemas


def arrow_schema(table: str) -> pa.Schema:
    """A table's contract schema with Iceberg field ids (``PARQUET:field_id``): top-level
    columns 1..n in order, list elements after them."""
    schema = table_schema(table)
    next_id = len(schema) + 1

    def with_id(fld: pa.Field, field_id: int) -> pa.Field:
        nonlocal next_id
        type_ = fld.type
        if pa.types.is_list(type_):
            element_id, next_id = next_id, next_id + 1
            type_ = pa.list_(with_id(type_.value_field, element_id))
        return fld.with_type(type_).with_metadata({b"PARQUET:field_id": str(field_id).encode()})

    return pa.schema([with_id(fld, i + 1) for i, fld in enumerate(schema)])


def table_arrow_schema(tbl: Table) -> pa.Schema:
    """An Iceberg table's current schema as the Arrow schema its data files are written in:
    the contract's types (string, binary, list), the table's field ids."""

    iceberg = schema_to_pyarrow(tbl.schema())
    return pa.schema([_plain(fld) for fld in iceberg])


def _plain(fld: pa.Field) -> pa.Field:
    """A field with the large Arrow types pyiceberg uses turned into the contract's."""
    type_ = fld.type
    if pa.types.is_large_string(type_):
        type_ = pa.string()
    elif pa.types.is_large_binary(type_):
        type_ = pa.binary()
    elif pa.types.is_large_list(type_) or pa.types.is_list(type_):
        type_ = pa.list_(_plain(type_.value_field))
    return fld.with_type(type_)


def run_filter(run_ids: Sequence[str]) -> str:
    """An Iceberg row filter selecting these runs (ids are validated: no quotes in them)."""
    quoted = ", ".join(f"'{validate_run_id(r)}'" for r in run_ids)
    return f"{PARTITION_COLUMN} IN ({quoted})"


# ----------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class TableChange:
    """What one commit does to one table's partition of a run."""

    table: str
    """A name in :data:`pipeline.tables.TABLES`."""
    add: Sequence[DataFile] = ()
    """Data files to add."""
    delete: Sequence[DataFile] = ()
    """Data files of the current snapshot to remove (an overwrite, in the same snapshot)."""
    properties: dict[str, str] = field(default_factory=dict)
    """Extra snapshot summary properties."""


class TableStore:
    """The result tables of one output root, opened through their catalog.

    Build with :meth:`open`. Not thread-safe; one per thread or process.
    """

    def __init__(self, root: Location, info: CatalogInfo, catalog: Catalog) -> None:
        self.root = root
        self.info = info
        self.catalog = catalog
        self._tables: dict[str, Table | None] = {}

    @classmethod
    def open(
        cls, root: Location, *, create: bool = False, allow_old: bool = False
    ) -> TableStore | None:
        """Connect to an output root's catalog.

        Args:
            root: The output root.
            create: Make the embedded catalog, the namespace and the tables where missing (and
                add columns the contract gained); without it, a root with no catalog gives None.
            allow_old: Do not refuse a root in the marker format (for the migration).

        Raises:
            OldTableFormatError: The root is in the marker format (unless ``allow_old``).
            InputError: An ``s3://`` root whose tables another machine's catalog committed.
            ServiceError: The catalog does not answer.
        """
        if not allow_old and exists(root.join(OLD_MARKER_DIR)):
            raise OldTableFormatError(
                f"{root.uri} holds result tables in the marker format of earlier fcnpipe "
                f"versions ({OLD_MARKER_DIR}/); convert them once with: fcnpipe tables migrate "
                f"{root.uri}"
            )
        info = catalog_info(root)
        if info.embedded is not None and not Path(info.embedded).exists():
            if not root.is_local and exists(root.join("runs", "metadata")):
                raise InputError(
                    f"{root.uri} has Iceberg tables, but this machine has no catalog of them "
                    f"({info.embedded}): they were committed through another machine's embedded "
                    "catalog; name a catalog shared by both with --catalog or FCNPIPE_CATALOG"
                )
            if not create:
                return None
            Path(info.embedded).parent.mkdir(parents=True, exist_ok=True)
        store = cls(root, info, _connect(info))
        if create:
            store._create()
        return store

    # -- tables

    def table(self, name: str) -> Table | None:
        """A table, loaded once (None where the catalog does not have it)."""
        if name not in self._tables:
            try:
                self._tables[name] = self.catalog.load_table(self.info.identifier(name))
            except (NoSuchTableError, NoSuchNamespaceError):
                self._tables[name] = None
        return self._tables[name]

    def require(self, name: str) -> Table:
        """A table that must exist (the writers create them all)."""
        tbl = self.table(name)
        if tbl is None:
            raise TableError(f"table {self.info.identifier(name)} is missing from the catalog")
        return tbl

    def refresh(self) -> None:
        """Forget the loaded tables: the next :meth:`table` reads the catalog again."""
        self._tables.clear()

    def location(self, name: str) -> str:
        """Where a table lives: ``OUT/<table>`` (an Iceberg URI)."""
        return self.root.join(name).iceberg_uri

    def data_uri(self, name: str, run_id: str) -> str:
        """Where a run's data files of a table go (Iceberg's default layout)."""
        return f"{self.require(name).location().rstrip('/')}/data/{PARTITION_COLUMN}={run_id}"

    def _create(self) -> None:
        """The namespace and the tables, created where missing, evolved where older."""
        with contextlib.suppress(NotImplementedError):  # catalogs without namespaces
            self.catalog.create_namespace_if_not_exists(self.info.namespace)
        for name in TABLES:
            tbl = self.table(name)
            if tbl is None:
                schema = pyarrow_to_schema(arrow_schema(name))
                spec = PartitionSpec(
                    PartitionField(
                        source_id=schema.find_field(PARTITION_COLUMN).field_id,
                        field_id=1000,
                        transform=IdentityTransform(),
                        name=PARTITION_COLUMN,
                    )
                )
                try:
                    tbl = self.catalog.create_table(
                        self.info.identifier(name),
                        schema=schema,
                        location=self.location(name),
                        partition_spec=spec,
                        properties={**TABLE_PROPERTIES, "fcnpipe.table": name},
                    )
                except TableAlreadyExistsError:  # created meanwhile by another run
                    tbl = self.catalog.load_table(self.info.identifier(name))
                self._tables[name] = tbl
            self._check_location(name, tbl)
            self._evolve(name, tbl)

    def _check_location(self, name: str, tbl: Table) -> None:
        expected = self.location(name).rstrip("/")
        if tbl.location().rstrip("/") != expected:
            raise ConfigError(
                f"catalog table {self.info.identifier(name)} lives at {tbl.location()}, not under "
                f"the output root {self.root.uri}: give this output root its own namespace "
                "(?namespace=... in the catalog URI)"
            )

    def _evolve(self, name: str, tbl: Table) -> None:
        """Add the columns the contract has and the table lacks (nullable: old rows lack them)."""
        have = set(tbl.schema().column_names)
        missing = [fld for fld in table_schema(name) if fld.name not in have]
        if not missing:
            return
        contract = pyarrow_to_schema(arrow_schema(name))
        with tbl.update_schema() as update_schema:
            for fld in missing:
                update_schema.add_column(
                    fld.name, contract.find_field(fld.name).field_type, required=False
                )
        logger.info("table %s: added column(s) %s", name, ", ".join(f.name for f in missing))
        self._tables[name] = self.catalog.load_table(self.info.identifier(name))

    # -- runs

    def run_files(self, name: str, run_id: str) -> list[DataFile]:
        """A run's data files of a table in the current snapshot."""
        tbl = self.table(name)
        if tbl is None or tbl.current_snapshot() is None:
            return []
        scan = tbl.scan(row_filter=run_filter([run_id]))
        return [task.file for task in scan.plan_files()]

    def run_history(self, name: str, run_id: str) -> set[str]:
        """Paths of the data files that any retained snapshot committing ``run_id`` added."""
        tbl = self.table(name)
        if tbl is None:
            return set()
        paths: set[str] = set()
        for snapshot in tbl.metadata.snapshots:
            if snapshot.summary is None or snapshot.summary.get(RUN_PROPERTY) != run_id:
                continue
            for manifest in snapshot.manifests(tbl.io):
                if manifest.added_snapshot_id != snapshot.snapshot_id:
                    continue
                for entry in manifest.fetch_manifest_entry(tbl.io, discard_deleted=False):
                    if entry.status == ManifestEntryStatus.ADDED:
                        paths.add(entry.data_file.file_path)
        return paths

    def committed_runs(self) -> list[str]:
        """Ids of the committed runs (those with a ``runs`` row in the current snapshot), sorted."""
        tbl = self.table("runs")
        if tbl is None or tbl.current_snapshot() is None:
            return []
        return sorted({str(task.file.partition[0]) for task in tbl.scan().plan_files()})

    def is_committed(self, run_id: str) -> bool:
        """Whether a run has its ``runs`` row in the current snapshot."""
        return bool(self.run_files("runs", run_id))

    def commit(
        self,
        run_id: str,
        plan: Callable[[TableStore], Sequence[TableChange]],
        properties: dict[str, str],
    ) -> dict[str, int]:
        """Publish a run's changes to its tables, atomically where the catalog can.

        Each table gets one snapshot: a fast append where it only adds files, an overwrite
        (removing ``delete`` and adding ``add`` at once) otherwise. A commit that loses a race
        with another commit is planned again on the new snapshots and redone (optimistic
        concurrency), up to twelve times with jittered backoff; ``plan`` sees the tables as
        they are then (where a catalog publishes table by table, some of the run's files may
        already be in), so what it returns is what is still to do.

        Args:
            run_id: The run.
            plan: What to do to each table, given this store (refreshed); tables without
                changes are left alone.
            properties: Snapshot summary properties of every table's snapshot.

        Returns:
            The new snapshot id of each changed table.

        Raises:
            ServiceError: The commit kept losing races.
        """
        for attempt in range(1, _COMMIT_ATTEMPTS + 1):
            todo = sorted(
                (c for c in plan(self) if c.add or c.delete),
                key=lambda c: COMMIT_ORDER.index(c.table),
            )
            try:
                return self._commit_once(run_id, todo, properties)
            except CommitFailedException as exc:
                if attempt == _COMMIT_ATTEMPTS:
                    raise ServiceError(
                        f"run {run_id}: commit to {self.info.namespace} still conflicting after "
                        f"{attempt} attempts ({exc})"
                    ) from exc
                delay = min(2.0, 0.05 * 2**attempt) * (0.5 + random.random())
                logger.warning(
                    "run %s: commit lost a race with another commit (%s); retrying in %.2f s",
                    run_id,
                    exc,
                    delay,
                )
                time.sleep(delay)
                self.refresh()
        raise AssertionError("unreachable")

    def _commit_once(
        self, run_id: str, todo: Sequence[TableChange], properties: dict[str, str]
    ) -> dict[str, int]:
        transactions = []
        for change in todo:
            tbl = self.require(change.table)
            tx = tbl.transaction()
            props = {**properties, **change.properties, RUN_PROPERTY: run_id}
            snapshot = tx.update_snapshot(snapshot_properties=props)
            if change.delete:
                with snapshot.overwrite() as op:
                    for data_file in change.delete:
                        op.delete_data_file(data_file)
                    for data_file in change.add:
                        op.append_data_file(data_file)
            else:
                with snapshot.fast_append() as fast:
                    for data_file in change.add:
                        fast.append_data_file(data_file)
            transactions.append((change.table, tx))
        publish = (
            self.catalog.publishing()
            if isinstance(self.catalog, _PublishingSqlCatalog)
            else contextlib.nullcontext()
        )
        committed: dict[str, int] = {}
        with publish:
            for name, tx in transactions:
                tbl = tx.commit_transaction()
                snap = tbl.current_snapshot()
                committed[name] = snap.snapshot_id if snap is not None else -1
        self.refresh()
        return committed


def _connect(info: CatalogInfo) -> Catalog:
    """The catalog client (nothing is created here beyond the embedded SQLite file)."""

    try:
        if info.is_sql:
            return _PublishingSqlCatalog(info.name, **info.properties)
        return load_catalog(info.name, **info.properties)
    except (OSError, ConnectionError) as exc:
        where = info.properties.get("uri", info.name)
        raise ServiceError(f"catalog {where}: {type(exc).__name__}: {exc}") from exc


class _PublishingSqlCatalog(SqlCatalog):
    """pyiceberg's SQL catalog, able to publish several tables' commits in one SQL transaction.

    Inside :meth:`publishing`, a table commit writes its new metadata file and is held back; at
    the end every held pointer moves at once, each only if it still points where its commit
    started from, or none moves (:class:`CommitFailedException`: the caller starts over).
    """

    _held: list[tuple[str, str, str, str]] | None = None

    def commit_table(self, table: Any, requirements: Any, updates: Any) -> CommitTableResponse:
        if self._held is None:
            return super().commit_table(table, requirements, updates)
        identifier = table.name()
        current = self.load_table(identifier)
        staged = self._update_and_stage_table(current, identifier, requirements, updates)
        self._write_metadata(staged.metadata, staged.io, staged.metadata_location)
        self._held.append(
            (
                self.namespace_to_string(self.namespace_from(identifier)),
                self.table_name_from(identifier),
                str(current.metadata_location),
                staged.metadata_location,
            )
        )
        return CommitTableResponse.model_validate(
            {"metadata": staged.metadata, "metadata-location": staged.metadata_location}
        )

    @contextlib.contextmanager
    def publishing(self) -> Iterator[None]:
        """Hold back the table commits made inside; publish them together at the end."""
        self._held = []
        try:
            yield
            held = self._held
        finally:
            self._held = None
        with Session(self.engine) as session, session.begin():
            for namespace, name, old, new in held:
                result = session.execute(
                    update(IcebergTables)
                    .where(
                        IcebergTables.catalog_name == self.name,
                        IcebergTables.table_namespace == namespace,
                        IcebergTables.table_name == name,
                        IcebergTables.metadata_location == old,
                    )
                    .values(metadata_location=new, previous_metadata_location=old)
                )
                if result.rowcount < 1:  # type: ignore[attr-defined]
                    raise CommitFailedException(f"{namespace}.{name} changed meanwhile")
