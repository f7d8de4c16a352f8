"""Incremental segmentation's pieces: object versions, the manifest's version column, the
stream option, and the ``predictions_latest`` SQL over hand-made tables."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from pipeline.config import make
from pipeline.data.layouts import build_manifest, manifest_hash, manifest_versions
from pipeline.errors import ConfigError
from pipeline.segment.config import SegmentConfig
from pipeline.storage import FileInfo, list_files
from pipeline.store.read import PREDICTIONS_LATEST_SQL
from pipeline.tables import TABLES

pytestmark = pytest.mark.unit


def test_version_is_the_etag_else_size_and_mtime() -> None:
    assert FileInfo("s3://b/a.png", "a.png", 5, 1.5, etag="abc").version == "etag:abc"
    assert FileInfo("/x/a.png", "a.png", 5, 1.5).version == "size:5,mtime:1.5"


def test_local_listing_versions_change_when_a_file_is_rewritten(tmp_path: Path) -> None:
    image = tmp_path / "images" / "a.png"
    image.parent.mkdir()
    image.write_bytes(b"one")
    before = build_manifest(str(tmp_path / "images"), layout="images")
    image.write_bytes(b"three")
    os.utime(image, (1e9, 1e9))
    after = build_manifest(str(tmp_path / "images"), layout="images")
    assert before["image_version"][0] != after["image_version"][0]
    (info,) = list_files(str(tmp_path / "images"))
    assert after["image_version"][0].as_py() == info.version
    # The hash covers the samples, not the versions.
    assert manifest_hash(after) == manifest_hash(
        after.drop_columns(["image_version"]).append_column(
            "image_version", pa.nulls(1, pa.string())
        )
    )


def test_manifest_versions_never_null() -> None:
    table = pa.table(
        {
            "image_uri": ["a", "b", "c"],
            "bytes": pa.array([1, 2, None], pa.int64()),
            "image_version": ["etag:x", None, None],
        }
    )
    assert manifest_versions(table).to_pylist() == ["etag:x", "size:2", "missing"]


def test_stream_names_are_checked() -> None:
    base = {"input_uri": "i", "model_uri": "m", "output_uri": "o"}
    assert make(SegmentConfig, **base, stream="front-1").stream == "front-1"
    with pytest.raises(ConfigError, match="stream"):
        make(SegmentConfig, **base, stream="../x")


def _runs(rows: list[tuple[str, str | None, int]]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "run_id": run_id,
                "kind": "segment",
                "num_images": 0,
                "num_errors": 0,
                "started_at": datetime(2026, 1, 1, tzinfo=UTC),
                "finished_at": datetime(2026, 1, day, tzinfo=UTC),
                "stream": stream,
            }
            for run_id, stream, day in rows
        ],
        schema=TABLES["runs"],
    )


def _predictions(rows: list[tuple[str, str, str]]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "run_id": run_id,
                "image_id": uri,
                "image_uri": uri,
                "height": 1,
                "width": 1,
                "label_map": b"",
                "class_pixel_counts": [1],
                "model_uri": "m",
                "image_version": version,
            }
            for run_id, uri, version in rows
        ],
        schema=TABLES["predictions"],
    )


def _inputs(rows: list[tuple[str, str, str]]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"run_id": r, "image_id": u, "image_uri": u, "image_version": v} for r, u, v in rows],
        schema=TABLES["inputs"],
    )


def test_latest_view_keeps_the_newest_listing_and_its_versions() -> None:
    con = duckdb.connect()
    # r1 sees a, b; r2 sees a rewritten (v2) and b; r3 sees only a (b deleted), nothing new.
    # "plain" is a run without a stream: never in the view.
    con.register(
        "runs", _runs([("r1", "s", 1), ("r2", "s", 2), ("r3", "s", 3), ("plain", None, 4)])
    )
    con.register(
        "predictions",
        _predictions(
            [("r1", "a", "v1"), ("r1", "b", "v1"), ("r2", "a", "v2"), ("plain", "a", "v2")]
        ),
    )
    con.register(
        "inputs",
        _inputs(
            [
                ("r1", "a", "v1"),
                ("r1", "b", "v1"),
                ("r2", "a", "v2"),
                ("r2", "b", "v1"),
                ("r3", "a", "v2"),
            ]
        ),
    )
    rows = con.sql(
        f"SELECT stream, image_uri, image_version, run_id FROM ({PREDICTIONS_LATEST_SQL})"
    ).fetchall()
    assert rows == [("s", "a", "v2", "r2")]
