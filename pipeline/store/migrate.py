"""Convert an output root of the marker format to Iceberg tables, in place.

Usage:
    fcnpipe tables migrate OUT

The marker format (fcnpipe before the Iceberg tables) kept each table as hive-partitioned
Parquet (``OUT/<table>/run_id=<id>/part-*.parquet``, ``run_id`` not inside the files) and one
``OUT/_committed/<run_id>.json`` per committed run listing its files. :func:`migrate` commits
each marker-listed run into the Iceberg tables (its rows rewritten as data files with
``run_id``, its finish time and extra facts in the snapshot summaries), then deletes the old
partition directories (files of uncommitted runs included: no reader ever saw them) and, last,
``OUT/_committed``: until then every other command refuses the root, and an interrupted
migration run again goes on where it stopped (runs already in the tables are skipped).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow.parquet as pq

from pipeline.storage import Location, StorageOptions, delete, exists, list_files, read_bytes
from pipeline.storage import resolve as resolve_uri
from pipeline.store.catalog import OLD_MARKER_DIR, TableStore
from pipeline.store.runs import RunWriter
from pipeline.tables import PARTITION_COLUMN, TABLES, TableError, validate_run_id

__all__ = ["MigrateResult", "migrate"]


@dataclass(frozen=True)
class MigrateResult:
    """What :func:`migrate` did."""

    migrated: list[str] = field(default_factory=list)
    """Runs committed into the Iceberg tables now."""
    already: list[str] = field(default_factory=list)
    """Runs found in the tables already (an earlier, interrupted migration)."""
    rows: dict[str, int] = field(default_factory=dict)
    """Rows converted per table."""


def migrate(
    out_uri: str | Location,
    *,
    options: StorageOptions | None = None,
    echo: Callable[[str], None] = print,
) -> MigrateResult:
    """Convert the committed runs of a marker-format root into its Iceberg tables.

    Args:
        out_uri: The output root.
        options: Storage options for a string URI (and the catalog).
        echo: Where progress lines go.

    Raises:
        TableError: A marker that cannot be read (the message names it).
    """
    root = resolve_uri(out_uri, options)
    result = MigrateResult()
    markers = root.join(OLD_MARKER_DIR)
    if not exists(markers):
        echo(f"{root.uri}: no marker-format runs ({OLD_MARKER_DIR}/ absent); nothing to migrate")
        return result
    store = TableStore.open(root, create=True, allow_old=True)
    assert store is not None  # created
    for info in list_files(markers, suffixes=(".json",)):
        doc = _marker(read_bytes(info.uri), info.uri)
        run_id = doc["run_id"]
        if store.is_committed(run_id):
            result.already.append(run_id)
            continue
        run = RunWriter(root, run_id, doc["kind"], store=store, max_rows=2**62)
        for table, entry in doc["tables"].items():
            for f in entry["files"]:
                data = pq.read_table(root.join(f["path"]).path, filesystem=root.pyarrow_fs()[0])
                if PARTITION_COLUMN in data.column_names:
                    data = data.drop_columns([PARTITION_COLUMN])
                run.write(table, data)
                result.rows[table] = result.rows.get(table, 0) + data.num_rows
        run.commit(doc.get("extra") or {}, finished_at=datetime.fromisoformat(doc["finished_at"]))
        result.migrated.append(run_id)
        echo(f"run {run_id}: committed to the Iceberg tables")
    for table in TABLES:
        for old in _old_partitions(root, table):
            delete(old)
    delete(markers)  # last: the root is refused until here
    echo(
        f"{root.uri}: {len(result.migrated)} run(s) migrated"
        + (f", {len(result.already)} already in the tables" if result.already else "")
        + f"; marker format removed ({OLD_MARKER_DIR}/ and {{table}}/run_id=*/)"
    )
    return result


def _marker(data: bytes, source: str) -> dict[str, Any]:
    """A marker's JSON, checked: its run id, kind, finish time and files."""
    try:
        doc: dict[str, Any] = json.loads(data)
        validate_run_id(doc["run_id"])
        datetime.fromisoformat(doc["finished_at"])
        if doc["kind"] not in ("train", "segment"):
            raise ValueError(f"kind {doc['kind']!r}")
        prefix = f"{PARTITION_COLUMN}={doc['run_id']}/"
        for table, entry in doc["tables"].items():
            for f in entry["files"]:
                if table not in TABLES or not str(f["path"]).startswith(f"{table}/{prefix}"):
                    raise ValueError(f"file {f['path']!r} is not part of the run")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TableError(f"{source}: not a valid commit marker ({exc})") from None
    return doc


def _old_partitions(root: Location, table: str) -> list[Location]:
    """The marker format's ``OUT/<table>/run_id=*`` directories (not Iceberg's data/, metadata/)."""
    base = root.join(table)
    if not exists(base):
        return []
    prefixes = {
        info.relpath.split("/", 1)[0]
        for info in list_files(base)
        if info.relpath.startswith(f"{PARTITION_COLUMN}=")
    }
    return [base.join(p) for p in sorted(prefixes)]
