"""Upkeep of the tables: expire old snapshots, delete files no snapshot needs.

Usage:
    fcnpipe tables maintain OUT [--older-than 7d]

Every commit adds a snapshot, and a replaced run (``--overwrite``) or a crashed attempt that is
never resumed leaves data files behind. :func:`maintain` expires the snapshots older than the
cutoff (never a table's current one, nor a branch or tag head), then deletes, under each
table's location, the files that no remaining snapshot or metadata file refers to and that are
older than the cutoff: data files of crashed attempts and of replaced versions, manifests and
manifest lists of expired snapshots, old metadata files. Committed rows stay readable.

The cutoff must exceed the longest run: files a run in progress has written but not committed
yet are referred to by nothing, and one deleted would be missing from that run.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pyiceberg.exceptions import CommitFailedException
from pyiceberg.manifest import ManifestEntryStatus
from pyiceberg.table import Table

from pipeline.errors import ConfigError
from pipeline.storage import Location, StorageOptions, delete, list_files, resolve
from pipeline.store.catalog import TableStore
from pipeline.tables import TABLES

__all__ = ["MaintainResult", "maintain", "parse_age"]

logger = logging.getLogger(__name__)

_AGE_RE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m``, ``0s`` as a timedelta.

    Raises:
        ConfigError: Anything else (the message shows the form).
    """
    match = _AGE_RE.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f"age must be a number and a unit s, m, h or d (e.g. 7d), got {text!r}")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


@dataclass(frozen=True)
class MaintainResult:
    """What :func:`maintain` did, per table."""

    expired: dict[str, int] = field(default_factory=dict)
    """Snapshots expired."""
    snapshots: dict[str, int] = field(default_factory=dict)
    """Snapshots left."""
    deleted: dict[str, list[str]] = field(default_factory=dict)
    """Files deleted (URIs)."""


def maintain(
    out_uri: str | Location,
    *,
    older_than: timedelta = timedelta(days=7),
    options: StorageOptions | None = None,
    echo: Callable[[str], None] = print,
) -> MaintainResult:
    """Expire snapshots older than ``older_than`` and delete orphan files as old.

    Args:
        out_uri: The output root.
        older_than: The cutoff's age (longer than any run).
        options: Storage options for a string URI (and the catalog).
        echo: Where the summary of each table goes.
    """
    root = resolve(out_uri, options)
    store = TableStore.open(root)
    result = MaintainResult()
    if store is None:
        echo(f"{root.uri}: no tables")
        return result
    cutoff = datetime.now(UTC) - older_than
    for name in TABLES:
        tbl = store.table(name)
        if tbl is None:
            continue
        before = len(tbl.metadata.snapshots)
        tbl = _expire(store, name, cutoff)
        deleted = _delete_orphans(root, tbl, cutoff)
        result.expired[name] = before - len(tbl.metadata.snapshots)
        result.snapshots[name] = len(tbl.metadata.snapshots)
        result.deleted[name] = deleted
        echo(
            f"{store.info.identifier(name)}: expired {result.expired[name]} snapshot(s), "
            f"{result.snapshots[name]} left; deleted {len(deleted)} orphan file(s)"
        )
    return result


def _expire(store: TableStore, name: str, cutoff: datetime) -> Table:
    """Expire a table's snapshots older than the cutoff; retried if a commit lands meanwhile."""
    for attempt in range(5):
        store.refresh()
        tbl = store.require(name)
        old = [
            s.snapshot_id
            for s in tbl.metadata.snapshots
            if s.timestamp_ms < cutoff.timestamp() * 1000
        ]
        if not old:
            return tbl
        try:
            tbl.maintenance.expire_snapshots().older_than(cutoff).commit()
        except CommitFailedException:
            if attempt == 4:
                raise
            continue
        store.refresh()
        return store.require(name)
    raise AssertionError("unreachable")


def _reachable(tbl: Table) -> set[str]:
    """Every file the table's metadata refers to: metadata files, manifest lists, manifests,
    live data files of every snapshot, statistics files."""
    io = tbl.io
    paths = {tbl.metadata_location}
    paths.update(entry.metadata_file for entry in tbl.metadata.metadata_log)
    paths.update(s.statistics_path for s in tbl.metadata.statistics)
    paths.update(s.statistics_path for s in tbl.metadata.partition_statistics)
    seen_manifests: set[str] = set()
    for snapshot in tbl.metadata.snapshots:
        paths.add(snapshot.manifest_list)
        for manifest in snapshot.manifests(io):
            paths.add(manifest.manifest_path)
            if manifest.manifest_path in seen_manifests:
                continue
            seen_manifests.add(manifest.manifest_path)
            for entry in manifest.fetch_manifest_entry(io, discard_deleted=False):
                if entry.status != ManifestEntryStatus.DELETED:
                    paths.add(entry.data_file.file_path)
    return paths


def _delete_orphans(root: Location, tbl: Table, cutoff: datetime) -> list[str]:
    """Delete the files under the table's location that nothing refers to, older than cutoff."""
    location = resolve(tbl.location(), root.options)
    reachable = _reachable(tbl)
    deleted = []
    for info in list_files(location):
        loc = location.join(info.relpath)
        if loc.iceberg_uri in reachable or loc.uri in reachable:
            continue
        if info.modified is None or info.modified >= cutoff.timestamp():
            continue
        logger.info("deleting orphan %s", loc.uri)
        delete(loc)
        deleted.append(loc.iceberg_uri)
    return deleted
