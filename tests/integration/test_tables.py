"""pipeline.store: the Iceberg result tables and the commit protocol, on local disk and a real
S3 server.

Tests taking ``storage_root`` run once per backend (``file`` and ``s3``).
"""

from __future__ import annotations

import json
import math
import pickle
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.storage import list_files, read_bytes, resolve, write_bytes
from pipeline.store.catalog import OldTableFormatError, TableStore
from pipeline.store.files import TableWriter
from pipeline.store.maintain import maintain
from pipeline.store.read import (
    check_not_committed,
    committed_runs,
    duckdb_connection,
    is_committed,
    read_table,
)
from pipeline.store.runs import RunWriter
from pipeline.tables import TABLES, RunExistsError, RunNotCommittedError, TableError
from tests.cli import fcnpipe_in_process
from tests.rows import LABEL_MAP, T0, metrics, predictions, runs_row

pytestmark = pytest.mark.integration


def _files(root: str, table: str, run_id: str) -> list[str]:
    """The run's data files of a table on storage (committed or not), as Iceberg URIs."""
    loc = resolve(root).join(table, "data", f"run_id={run_id}")
    return sorted(loc.join(f.relpath).iceberg_uri for f in list_files(loc))


def _store(root: str) -> TableStore:
    store = TableStore.open(resolve(root))
    assert store is not None
    return store


def _committed_files(root: str, table: str, run_id: str) -> list[str]:
    return sorted(f.file_path for f in _store(root).run_files(table, run_id))


def _segment_run(root: str, run_id: str, ids: list[str], **kwargs: Any) -> RunWriter:
    run = RunWriter(root, run_id, "segment", **kwargs)
    run.write("predictions", predictions(ids))
    run.write("runs", [runs_row("segment", 0.5)])
    return run


def test_readers_see_committed_runs_only(storage_root: str) -> None:
    done, crashed = "segment-a", "segment-b"
    run = RunWriter(storage_root, done, "segment")
    run.write("predictions", predictions(["x", "y", "z"]))
    for image_id in ("x", "y", "z"):
        run.write("class_metrics", metrics(image_id))
    run.write("runs", [runs_row("segment", 0.66)])
    result = run.commit(extra={"model_uri": "s3://out/models/train-1"})
    assert result.rows == {"predictions": 3, "class_metrics": 6, "runs": 1}
    assert set(result.snapshots) == {"predictions", "class_metrics", "runs"}

    other = _segment_run(storage_root, crashed, ["p", "q"])
    other.flush()  # data files on storage, but never committed
    assert len(_files(storage_root, "predictions", crashed)) == 1

    assert committed_runs(storage_root) == [done]
    assert is_committed(storage_root, done) and not is_committed(storage_root, crashed)
    preds = read_table(storage_root, "predictions")
    assert preds.schema == TABLES["predictions"]
    assert preds["run_id"].to_pylist() == [done] * 3
    assert sorted(preds["image_id"].to_pylist()) == ["x", "y", "z"]
    assert preds["label_map"][0].as_py() == LABEL_MAP
    some = read_table(storage_root, "predictions", done, columns=["run_id", "image_id"])
    assert some.column_names == ["run_id", "image_id"] and some["run_id"][0].as_py() == done
    runs = read_table(storage_root, "runs", [done])
    assert runs["class_iou"].to_pylist() == [[0.9, None]]  # NaN stored as null
    assert runs["started_at"].to_pylist() == [T0]
    with pytest.raises(RunNotCommittedError, match=crashed):
        read_table(storage_root, "predictions", [crashed])

    # The Iceberg tables themselves: one snapshot naming the run, its files only.
    store = _store(storage_root)
    tbl = store.require("predictions")
    snapshot = tbl.current_snapshot()
    assert snapshot is not None and snapshot.summary is not None
    assert snapshot.summary["fcnpipe.run-id"] == done
    assert json.loads(snapshot.summary["fcnpipe.extra"])["model_uri"].endswith("train-1")
    assert [f.file_path for f in store.run_files("predictions", done)] == list(
        result.files["predictions"]
    )
    assert sorted(tbl.scan().to_arrow()["image_id"].to_pylist()) == ["x", "y", "z"]

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

    with pytest.raises(TableError, match="no row in the runs table"):
        RunWriter(storage_root, "segment-c", "segment").commit()


def test_crashed_run_resumes_without_duplicates(storage_root: str) -> None:
    run_id = "segment-crash"
    first = RunWriter(storage_root, run_id, "segment")
    actor = first.writer("predictions", writer_id="actor0")
    actor.write(predictions([f"img{i}" for i in range(5)]))
    actor.flush()
    first.write("predictions", predictions(["img5", "img6"]))  # buffered only: lost
    (good,) = _files(storage_root, "predictions", run_id)
    # The crash: a truncated data file and a temporary leftover beside the good one.
    data = read_bytes(good.removeprefix("file://"))
    truncated = good.replace("actor0", "actor1").replace("part-2", "part-3")
    write_bytes(truncated.removeprefix("file://"), data[: len(data) // 2])
    leftover = good.rsplit("/", 1)[0] + "/.part-x.parquet.tmp-1234"
    write_bytes(leftover.removeprefix("file://"), b"partial")
    del first, actor

    second = RunWriter(storage_root, run_id, "segment")
    assert second.resumed
    done = second.existing_ids("predictions")
    assert done == {f"img{i}" for i in range(5)}
    assert _files(storage_root, "predictions", run_id) == [good]  # debris deleted
    todo = [f"img{i}" for i in range(10) if f"img{i}" not in done]
    second.write("predictions", predictions(todo))
    assert second.existing_ids("predictions") == {f"img{i}" for i in range(10)}
    second.write("runs", [runs_row("segment", 0.5)])
    second.commit()

    preds = read_table(storage_root, "predictions")
    assert sorted(preds["image_id"].to_pylist()) == sorted(f"img{i}" for i in range(10))
    listed = _committed_files(storage_root, "predictions", run_id)
    assert good in listed and len(listed) == 2
    assert listed == _files(storage_root, "predictions", run_id)


def test_resumed_training_keeps_the_latest_row_per_epoch(tmp_path: Path) -> None:
    storage_root = str(tmp_path / "out")
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
        assert _committed_files(storage_root, table, run_id) == _files(storage_root, table, run_id)


def test_overwrite_replaces_a_committed_run_in_one_snapshot(storage_root: str) -> None:
    run_id = "segment-over"
    run = _segment_run(storage_root, run_id, ["old1", "old2"])
    run.write(
        "errors",
        [{"image_uri": "s3://in/bad.jpg", "stage": "read", "error_type": "X", "message": "m"}],
    )
    run.commit()
    old_files = _committed_files(storage_root, "predictions", run_id)

    with pytest.raises(RunExistsError, match=r"segment-over.*overwrite=True"):
        RunWriter(storage_root, run_id, "segment")
    with pytest.raises(RunExistsError, match="--overwrite"):
        check_not_committed(storage_root, run_id, overwrite=False)

    again = _segment_run(storage_root, run_id, ["new"], overwrite=True)
    assert not again.resumed and again.existing_ids("predictions") == {"new"}
    again.flush()
    # The committed version stays what readers see until the new one commits.
    assert sorted(read_table(storage_root, "predictions")["image_id"].to_pylist()) == [
        "old1",
        "old2",
    ]
    before = {t: _store(storage_root).require(t).current_snapshot() for t in TABLES}
    again.commit()
    assert read_table(storage_root, "predictions")["image_id"].to_pylist() == ["new"]
    assert read_table(storage_root, "errors").num_rows == 0
    store = _store(storage_root)
    for table in ("predictions", "errors", "runs"):  # one overwrite snapshot each
        snapshot = store.require(table).current_snapshot()
        assert snapshot is not None and snapshot.summary is not None
        assert snapshot.summary.operation.value == "overwrite", table
        assert snapshot.parent_snapshot_id == before[table].snapshot_id  # type: ignore[union-attr]
    assert store.run_files("errors", run_id) == []
    # The replaced files stay for the older snapshots, until `tables maintain`.
    assert set(old_files) <= set(_files(storage_root, "predictions", run_id))


def test_many_writers_append_to_one_run(tmp_path: Path) -> None:
    storage_root = str(tmp_path / "out")
    run_id = "segment-many"
    run = RunWriter(storage_root, run_id, "segment", max_rows=7)
    # Stand-ins for Ray workers: each gets its own writer; one is built from a pickled target.
    writers = [run.writer("predictions", writer_id=f"actor{i}") for i in range(2)]
    target = pickle.loads(pickle.dumps(run.target("predictions")))
    writers.append(TableWriter(target, max_rows=7))
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
    run.write("runs", [runs_row("segment", 0.5)])
    result = run.commit()
    ids = read_table(storage_root, "predictions")["image_id"].to_pylist()
    assert len(ids) == 75 and len(set(ids)) == 75
    assert result.rows["predictions"] == 75
    assert len(result.files["predictions"]) == 3 * math.ceil(25 / 7)
    con = duckdb_connection(storage_root, [run_id])
    assert con.sql("SELECT count(DISTINCT image_id) FROM predictions").fetchall() == [(75,)]


def test_iter_written_is_what_commit_keeps(tmp_path: Path) -> None:
    root, run_id = str(tmp_path / "out"), "segment-overlap"
    run = RunWriter(root, run_id, "segment")
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
    assert list(run.iter_written("runs", ["kind"])) == []
    run.write("runs", [runs_row("segment", 0.5)])
    run.commit()
    committed = read_table(root, "class_metrics", [run_id])
    assert (
        sorted(
            zip(committed["image_id"].to_pylist(), committed["class_id"].to_pylist(), strict=True)
        )
        == pairs
    )
    # A key's rows never straddle two files, whatever the file size limit.
    split = RunWriter(root, "segment-split", "segment", max_rows=3)
    split.write("class_metrics", [row for i in range(4) for row in metrics(f"s{i}")])
    split.write("runs", [runs_row("segment", 0.5)])
    assert split.commit().rows["class_metrics"] == 8


def test_concurrent_runs_both_land(tmp_path: Path) -> None:
    """Runs committing at once land one after the other: the one that loses the race is
    planned again on the winner's snapshots (optimistic concurrency)."""
    storage_root = str(tmp_path / "out")
    first = _segment_run(storage_root, "segment-first", ["a", "b"])
    second = _segment_run(storage_root, "segment-second", ["c"])
    later = [_segment_run(storage_root, f"segment-t{i}", [f"t{i}"]) for i in range(3)]
    # `first` has loaded its tables; `second` commits before `first` publishes.
    commit_once = first.store._commit_once

    def interleaved(*args: Any) -> dict[str, int]:
        if not is_committed(storage_root, "segment-second"):
            second.commit()
        return commit_once(*args)

    first.store._commit_once = interleaved  # type: ignore[method-assign]
    first.commit()
    # And three at once from threads, each with its own catalog connection.
    barrier = threading.Barrier(len(later))
    failures: list[BaseException] = []

    def commit(run: RunWriter) -> None:
        try:
            barrier.wait(timeout=60)
            run.commit()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=commit, args=(run,)) for run in later]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    expected = sorted(["segment-first", "segment-second", "segment-t0", "segment-t1", "segment-t2"])
    assert committed_runs(storage_root) == expected
    ids = read_table(storage_root, "predictions")["image_id"].to_pylist()
    assert sorted(ids) == ["a", "b", "c", "t0", "t1", "t2"]


def test_maintain_deletes_orphans_and_keeps_committed_rows(storage_root: str) -> None:
    _segment_run(storage_root, "segment-kept", ["k1", "k2"]).commit()
    _segment_run(storage_root, "segment-replaced", ["r1"]).commit()
    replaced = _committed_files(storage_root, "predictions", "segment-replaced")
    _segment_run(storage_root, "segment-replaced", ["r2"], overwrite=True).commit()
    crashed = _segment_run(storage_root, "segment-crashed", ["c1"])
    crashed.flush()
    debris = _files(storage_root, "predictions", "segment-crashed")
    assert debris and replaced

    young = maintain(storage_root, echo=lambda _: None)  # 7 days: nothing is old enough
    assert not any(young.deleted.values()) and not any(young.expired.values())
    result = maintain(storage_root, older_than=timedelta(0), echo=lambda _: None)
    assert result.snapshots["predictions"] == 1 and result.expired["predictions"] == 2
    gone = set(result.deleted["predictions"])
    assert set(debris) <= gone and set(replaced) <= gone
    assert _files(storage_root, "predictions", "segment-crashed") == []
    assert committed_runs(storage_root) == ["segment-kept", "segment-replaced"]
    rows = read_table(storage_root, "predictions").sort_by("image_id")
    assert rows["image_id"].to_pylist() == ["k1", "k2", "r2"]
    assert rows["label_map"].to_pylist() == [LABEL_MAP] * 3
    # The tables still take commits.
    _segment_run(storage_root, "segment-after", ["z"]).commit()
    assert read_table(storage_root, "predictions", ["segment-after"]).num_rows == 1


def test_marker_format_root_is_refused_then_migrated(tmp_path: Path) -> None:
    """An output root of the marker format: every command names `fcnpipe tables migrate`,
    which converts its committed runs (and drops an uncommitted one) in place."""
    out = tmp_path / "old"
    old = {"segment-m": (["m1", "m2"], True), "segment-u": (["u1"], False)}
    for run_id, (ids, committed) in old.items():
        part = f"predictions/run_id={run_id}/part-20261121T063000000000Z-driver-00001-abc.parquet"
        rows = pa.Table.from_pylist(predictions(ids))
        (out / part).parent.mkdir(parents=True)
        pq.write_table(rows, out / part)
        runs_part = f"runs/run_id={run_id}/part-20261121T063000000001Z-driver-00001-abc.parquet"
        (out / runs_part).parent.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist([runs_row("segment", 0.5)]), out / runs_part)
        if committed:
            marker = {
                "format_version": 1,
                "run_id": run_id,
                "kind": "segment",
                "finished_at": "2026-11-21T06:31:00+00:00",
                "tables": {
                    "predictions": {"rows": 2, "files": [{"path": part, "rows": 2}]},
                    "runs": {"rows": 1, "files": [{"path": runs_part, "rows": 1}]},
                },
                "extra": {"model_uri": "s3://out/models/train-1"},
            }
            (out / "_committed").mkdir()
            (out / "_committed" / f"{run_id}.json").write_text(json.dumps(marker))

    with pytest.raises(OldTableFormatError, match=f"fcnpipe tables migrate {out}"):
        read_table(str(out), "predictions")
    refused = fcnpipe_in_process("runs", str(out))
    assert refused.returncode == 2 and "fcnpipe tables migrate" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    migrated = fcnpipe_in_process("tables", "migrate", str(out))
    assert migrated.returncode == 0, migrated.stderr
    assert "1 run(s) migrated" in migrated.stdout
    assert committed_runs(str(out)) == ["segment-m"]
    rows = read_table(str(out), "predictions")
    assert sorted(rows["image_id"].to_pylist()) == ["m1", "m2"]
    assert rows["label_map"].to_pylist() == [LABEL_MAP] * 2
    (summary,) = read_table(str(out), "runs").to_pylist()
    assert summary["run_id"] == "segment-m" and summary["mean_iou"] == 0.5
    assert not (out / "_committed").exists()
    assert not list(out.glob("*/run_id=*"))  # the old partitions, the uncommitted run's too
    again = fcnpipe_in_process("tables", "migrate", str(out))
    assert again.returncode == 0 and "nothing to migrate" in again.stdout


def test_tables_gain_the_columns_the_contract_gains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tables made by an older fcnpipe get a new column on the next write; old rows read it
    as null."""
    root = str(tmp_path / "out")
    full = TABLES["runs"]
    monkeypatch.setitem(TABLES, "runs", full.remove(full.get_field_index("engine")))
    older = RunWriter(root, "segment-older", "segment")
    older.write("predictions", predictions(["o"]))
    older.write("runs", [runs_row("segment", 0.5)])
    older.commit()
    assert "engine" not in _store(root).require("runs").schema().column_names
    monkeypatch.setitem(TABLES, "runs", full)

    newer = RunWriter(root, "segment-newer", "segment")
    newer.write("runs", [{**runs_row("segment", 0.6), "engine": "torch 2.14.1"}])
    newer.commit()
    assert "engine" in _store(root).require("runs").schema().column_names
    runs = read_table(root, "runs").sort_by("run_id")
    assert runs["engine"].to_pylist() == ["torch 2.14.1", None]  # newer, older


def test_a_run_published_table_by_table_and_cut_short_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REST, Hive and Glue catalogs publish a run table by table, ``runs`` last. Cut short
    between two tables, the run is not committed for our readers, and its rerun completes
    it without a duplicate row. (Simulated on the SQL catalog without its one-transaction
    publishing.)"""
    from pyiceberg.table import Transaction

    from pipeline.store.catalog import CatalogInfo

    root, run_id = str(tmp_path / "out"), "segment-cut"
    monkeypatch.setattr(CatalogInfo, "is_sql", property(lambda self: False))
    first = _segment_run(root, run_id, ["a", "b"])
    first.write("class_metrics", metrics("a") + metrics("b"))
    first.write("errors", [{"image_uri": "u", "stage": "read", "error_type": "E", "message": "m"}])
    commit_transaction = Transaction.commit_transaction
    published: list[str] = []

    def cut_short(tx: Transaction) -> Any:
        if len(published) == 2:  # errors and class_metrics are in; predictions and runs not
            raise SystemExit("killed")
        published.append(tx._table.name()[-1])
        return commit_transaction(tx)

    monkeypatch.setattr(Transaction, "commit_transaction", cut_short)
    with pytest.raises(SystemExit):
        first.commit()
    monkeypatch.setattr(Transaction, "commit_transaction", commit_transaction)
    assert published == ["errors", "class_metrics"]
    assert committed_runs(root) == []  # no runs row: not committed, for our readers
    assert read_table(root, "class_metrics").num_rows == 0
    assert len(_store(root).run_files("class_metrics", run_id)) == 1  # other engines: there

    second = RunWriter(root, run_id, "segment")
    assert second.resumed and second.existing_ids("predictions") == {"a", "b"}
    second.write("predictions", predictions(["c"]))
    second.write("class_metrics", metrics("c"))
    second.write("runs", [runs_row("segment", 0.7)])
    second.commit()
    assert committed_runs(root) == [run_id]
    assert sorted(read_table(root, "predictions")["image_id"].to_pylist()) == ["a", "b", "c"]
    cm = read_table(root, "class_metrics")["image_id"].to_pylist()
    assert sorted(cm) == ["a", "a", "b", "b", "c", "c"]
    assert read_table(root, "errors").num_rows == 1
    assert read_table(root, "runs")["mean_iou"].to_pylist() == [0.7]
