"""pipeline.tables: result tables and the commit protocol, on local disk and a real S3 server.

Tests taking ``storage_root`` run once per backend (``file`` and ``s3``).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import threading
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.storage import list_files, read_bytes, resolve, write_bytes
from pipeline.tables import (
    HIVE_PARTITIONING,
    TABLES,
    RunExistsError,
    RunNotCommittedError,
    RunWriter,
    TableError,
    TableWriter,
    committed_runs,
    duckdb_connection,
    file_schema,
    is_committed,
    load_marker,
    new_run_id,
    read_table,
)
from tests.rows import LABEL_MAP, T0, metrics, predictions, runs_row

pytestmark = pytest.mark.integration


def _partition_files(root: str, table: str, run_id: str) -> list[str]:
    loc = resolve(root).join(table, f"run_id={run_id}")
    return [f"{table}/run_id={run_id}/{f.relpath}" for f in list_files(loc)]


def _marker_files(root: str, run_id: str, table: str) -> list[str]:
    return sorted(f.path for f in load_marker(root, run_id).tables.get(table, ()))


def test_readers_see_committed_runs_only(storage_root: str) -> None:
    done, crashed = "segment-a", "segment-b"
    run = RunWriter(storage_root, done, "segment")
    run.write("predictions", predictions(["x", "y", "z"]))
    for image_id in ("x", "y", "z"):
        run.write("class_metrics", metrics(image_id))
    run.write("runs", [runs_row("segment", 0.66)])
    marker = run.commit(extra={"model_uri": "s3://out/models/train-1"})
    assert marker.rows("predictions") == 3 and marker.extra["model_uri"].endswith("train-1")

    other = RunWriter(storage_root, crashed, "segment")
    other.write("predictions", predictions(["p", "q"]))
    other.write("runs", [runs_row("segment", 0.1)])
    other.flush()  # files on storage, but never committed

    assert committed_runs(storage_root) == [done]
    assert is_committed(storage_root, done) and not is_committed(storage_root, crashed)

    preds = read_table(storage_root, "predictions")
    assert preds.schema == TABLES["predictions"]
    assert preds.schema.field("run_id").type == pa.string()
    assert preds["run_id"].to_pylist() == [done] * 3
    assert sorted(preds["image_id"].to_pylist()) == ["x", "y", "z"]
    assert preds["label_map"][0].as_py() == LABEL_MAP
    some = read_table(storage_root, "predictions", done, columns=["run_id", "image_id"])
    assert some.column_names == ["run_id", "image_id"] and some["run_id"][0].as_py() == done
    doc = json.loads(read_bytes(resolve(storage_root).join("_committed", f"{done}.json")))
    assert doc["format_version"] == 1 and doc["kind"] == "segment" and doc["finished_at"]
    assert doc["tables"]["predictions"]["rows"] == 3
    assert [f["path"] for f in doc["tables"]["predictions"]["files"]] == _partition_files(
        storage_root, "predictions", done
    )
    runs = read_table(storage_root, "runs", [done])
    assert runs["class_iou"].to_pylist() == [[0.9, None]]  # NaN stored as null
    assert runs["started_at"].to_pylist() == [T0]
    with pytest.raises(RunNotCommittedError, match=crashed):
        read_table(storage_root, "predictions", [crashed])

    con = duckdb_connection(storage_root)
    assert con.sql("SELECT run_id, count(*) FROM predictions GROUP BY 1").fetchall() == [(done, 3)]
    assert con.sql("SELECT DISTINCT typeof(run_id) FROM predictions").fetchall() == [("VARCHAR",)]
    joined = con.sql(
        'SELECT r.run_id, r.mean_iou, sum(c.intersection) / sum(c."union") AS iou, count(*) '
        "FROM runs r JOIN class_metrics c USING (run_id) GROUP BY ALL"
    ).fetchall()
    assert joined == [(done, 0.66, pytest.approx(48 / 72), 6)]
    for empty in ("errors", "training"):
        assert [row[0] for row in con.sql(f"DESCRIBE {empty}").fetchall()] == TABLES[empty].names
        assert con.sql(f"SELECT count(*) FROM {empty}").fetchall() == [(0,)]


def test_raw_hive_reads_give_a_string_run_id(storage_root: str) -> None:
    run_id = new_run_id("segment")
    run = RunWriter(storage_root, run_id, "segment")
    run.write("predictions", predictions(["a", "b"]))
    run.commit()
    root = resolve(storage_root)
    fs, base = root.join("predictions").pyarrow_fs()
    for partitioning in ("hive", HIVE_PARTITIONING):
        table = ds.dataset(base, filesystem=fs, format="parquet", partitioning=partitioning)
        assert table.schema.field("run_id").type == pa.string()
        assert table.to_table()["run_id"].to_pylist() == [run_id] * 2
    (part,) = _partition_files(storage_root, "predictions", run_id)
    in_file = pq.read_schema(io.BytesIO(read_bytes(root.join(part))))
    assert in_file.names == file_schema("predictions").names  # run_id is not inside the files
    if root.is_local:  # DuckDB reads S3 only with httpfs, which cannot be installed here
        glob = f"{root.path}/predictions/*/*.parquet"
        rows = (
            duckdb.connect()
            .sql(
                f"SELECT typeof(run_id), run_id, count(*) FROM read_parquet('{glob}', "
                "hive_partitioning = true) GROUP BY ALL"
            )
            .fetchall()
        )
        assert rows == [("VARCHAR", run_id, 2)]


def test_crashed_run_resumes_without_duplicates(storage_root: str) -> None:
    run_id = "segment-crash"
    first = RunWriter(storage_root, run_id, "segment")
    actor = first.writer("predictions", writer_id="actor0")
    actor.write(predictions([f"img{i}" for i in range(5)]))
    actor.flush()
    first.write("predictions", predictions(["img5", "img6"]))  # buffered only: lost
    good = _partition_files(storage_root, "predictions", run_id)
    assert len(good) == 1
    # The crash: a truncated part file and a temporary leftover beside the good one.
    root = resolve(storage_root)
    data = read_bytes(root.join(good[0]))
    partition = f"predictions/run_id={run_id}"
    truncated = f"{partition}/part-20991231T000000000000Z-actor1-00001-abcdef.parquet"
    write_bytes(root.join(truncated), data[: len(data) // 2])
    write_bytes(root.join(partition, ".part-x.parquet.tmp-1234"), b"partial")
    del first, actor

    second = RunWriter(storage_root, run_id, "segment")
    assert second.resumed
    done = second.existing_ids("predictions")
    assert done == {f"img{i}" for i in range(5)}
    assert _partition_files(storage_root, "predictions", run_id) == good  # debris deleted
    todo = [f"img{i}" for i in range(10) if f"img{i}" not in done]
    second.write("predictions", predictions(todo))
    assert second.existing_ids("predictions") == {f"img{i}" for i in range(10)}
    second.commit()

    preds = read_table(storage_root, "predictions")
    assert sorted(preds["image_id"].to_pylist()) == sorted(f"img{i}" for i in range(10))
    listed = _marker_files(storage_root, run_id, "predictions")
    assert good[0] in listed and truncated not in listed and len(listed) == 2
    assert listed == sorted(_partition_files(storage_root, "predictions", run_id))


def test_resumed_training_keeps_the_latest_row_per_epoch(storage_root: str) -> None:
    run_id = "train-resume"

    def epoch(e: int, loss: float) -> dict[str, Any]:
        return {"epoch": e, "train_loss": loss, "val_mean_iou": float("nan"), "lr": 1e-4}

    first = RunWriter(storage_root, run_id, "train")
    first.write("training", [epoch(e, 1.0) for e in range(3)])
    first.write("runs", [runs_row("train", 0.1)])  # a crash after the summary, before commit
    first.flush()
    del first

    second = RunWriter(storage_root, run_id, "train")
    assert second.existing_ids("training", key="epoch") == {0, 1, 2}
    # Resumed from the epoch-1 checkpoint: epoch 2 is trained again.
    second.write("training", [epoch(e, 2.0) for e in (2, 3)])
    second.write("runs", [runs_row("train", 0.9)])
    second.commit()

    training = read_table(storage_root, "training").sort_by("epoch")
    assert training["epoch"].to_pylist() == [0, 1, 2, 3]
    assert training["train_loss"].to_pylist() == [1.0, 1.0, 2.0, 2.0]
    assert training["val_mean_iou"].null_count == 4
    runs = read_table(storage_root, "runs")
    assert runs["mean_iou"].to_pylist() == [0.9] and runs["kind"].to_pylist() == ["train"]
    for table in ("training", "runs"):  # superseded files are gone after the commit
        assert _marker_files(storage_root, run_id, table) == sorted(
            _partition_files(storage_root, table, run_id)
        )


def test_overwrite_replaces_a_committed_run(storage_root: str) -> None:
    run_id = "segment-over"
    run = RunWriter(storage_root, run_id, "segment")
    run.write("predictions", predictions(["old1", "old2"]))
    run.write(
        "errors",
        [{"image_uri": "s3://in/bad.jpg", "stage": "read", "error_type": "X", "message": "m"}],
    )
    run.commit()

    with pytest.raises(RunExistsError, match=r"segment-over.*overwrite=True"):
        RunWriter(storage_root, run_id, "segment")

    again = RunWriter(storage_root, run_id, "segment", overwrite=True)
    assert not again.resumed and not is_committed(storage_root, run_id)
    assert again.existing_ids("predictions") == set()
    again.write("predictions", predictions(["new"]))
    again.commit()
    assert read_table(storage_root, "predictions")["image_id"].to_pylist() == ["new"]
    assert read_table(storage_root, "errors").num_rows == 0
    assert _partition_files(storage_root, "errors", run_id) == []
    assert len(_partition_files(storage_root, "predictions", run_id)) == 1


def test_many_writers_append_to_one_run(storage_root: str) -> None:
    run_id = "segment-many"
    run = RunWriter(storage_root, run_id, "segment", max_rows=7)
    # Stand-ins for Ray actors: each gets its own writer; one is a pickled copy.
    writers = [run.writer("predictions", writer_id=f"actor{i}") for i in range(2)]
    writers.append(pickle.loads(pickle.dumps(run.writer("predictions"))))
    busy = run.writer("errors")
    busy.write([{"image_uri": "u", "stage": "read", "error_type": "E", "message": "m"}])
    with pytest.raises(TableError, match="cannot be pickled"):
        pickle.dumps(busy)
    busy.close()
    errors: list[BaseException] = []

    def work(rank: int, writer: TableWriter) -> None:
        try:
            for start in range(0, 25, 5):
                writer.write(predictions([f"r{rank}-{i}" for i in range(start, start + 5)]))
            writer.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r, w)) for r, w in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    marker = run.commit()
    ids = read_table(storage_root, "predictions")["image_id"].to_pylist()
    assert len(ids) == 75 and len(set(ids)) == 75
    assert marker.rows("predictions") == 75
    assert len(marker.tables["predictions"]) == 3 * math.ceil(25 / 7)
    con = duckdb_connection(storage_root, [run_id])
    assert con.sql("SELECT count(DISTINCT image_id) FROM predictions").fetchall() == [(75,)]


def test_iter_written_is_what_commit_keeps(storage_root: str) -> None:
    run_id = "segment-overlap"
    run = RunWriter(storage_root, run_id, "segment")
    # Three files; img1 and img2 are written again by later files (a rerun after a crash).
    for ids in (["img0", "img1"], ["img1", "img2", "img3"], ["img2"]):
        writer = run.writer("class_metrics")
        writer.write([row for image_id in ids for row in metrics(image_id)])
        writer.close()
    run.write("class_metrics", metrics("img4"))  # still buffered: flushed by iter_written
    written = pa.concat_tables(run.iter_written("class_metrics", ["image_id", "class_id"]))
    pairs = sorted(
        zip(written["image_id"].to_pylist(), written["class_id"].to_pylist(), strict=True)
    )
    assert pairs == [(f"img{i}", c) for i in range(5) for c in (0, 1)]  # each image once
    runs = list(run.iter_written("runs", ["kind"]))
    assert runs == []
    run.commit()
    committed = read_table(storage_root, "class_metrics", [run_id])
    assert (
        sorted(
            zip(committed["image_id"].to_pylist(), committed["class_id"].to_pylist(), strict=True)
        )
        == pairs
    )
