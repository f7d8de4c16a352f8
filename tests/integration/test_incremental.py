"""Incremental segmentation of a growing bucket (``segment --stream``) on the real S3 server.

What a user relies on: each run of a stream segments only the objects that are new or
rewritten since the stream's committed runs (with the same model); ``predictions_latest``
holds one current prediction per object that still exists; a killed run, rerun, leaves no
duplicate; a new model re-segments everything.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infra.local.prefect_server import PrefectServer
from infra.local.seaweedfs import SeaweedS3
from pipeline.config import make
from pipeline.segment.config import SegmentConfig
from pipeline.segment.driver import SegmentResult, segment
from pipeline.storage import delete, join, list_files, read_bytes, write_bytes
from pipeline.store.read import committed_runs, duckdb_connection, read_table
from tests.cli import FCNPIPE
from tests.integration.test_segment import _model

pytestmark = pytest.mark.integration


def _put(camera: str, name: str, seed: int) -> str:
    """A 64 px RGB PNG at ``camera/name.png`` (its content set by ``seed``)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    uri = join(camera, f"{name}.png")
    write_bytes(uri, buf.getvalue())
    return uri


def _run(camera: str, model: str, out: str, run_id: str) -> SegmentResult:
    return segment(
        make(
            SegmentConfig,
            input_uri=camera,
            model_uri=model,
            output_uri=out,
            run_id=run_id,
            stream="cam",
            batch_size=4,
            actors=1,
            backend="torch",
        ),
        echo=lambda _: None,
    )


def _run_uris(out: str, run_id: str) -> list[str]:
    return sorted(read_table(out, "predictions", [run_id])["image_uri"].to_pylist())


def _latest(out: str) -> dict[str, dict[str, object]]:
    rows = (
        duckdb_connection(out)
        .sql("SELECT stream, image_uri, image_version, run_id FROM predictions_latest")
        .fetch_arrow_table()
        .to_pylist()
    )
    by_uri = {row["image_uri"]: row for row in rows}
    assert len(by_uri) == len(rows), "one row per object"
    assert {row["stream"] for row in rows} <= {"cam"}
    return by_uri


def test_stream_segments_only_new_and_changed_objects(
    s3_env: SeaweedS3, bucket: str, ray_local: None
) -> None:
    root = f"s3://{bucket}"
    camera, out = join(root, "camera"), join(root, "out")
    model = _model(root)
    first = [_put(camera, f"img_{i:03d}", seed=i) for i in range(3)]

    result = _run(camera, model, out, "r1")
    assert (result.num_images, result.unchanged) == (3, 0)
    assert _run_uris(out, "r1") == first
    versions = read_table(out, "predictions", ["r1"])["image_version"].to_pylist()
    assert all(str(v).startswith("etag:") for v in versions), versions  # the listing's ETag
    runs = {r["run_id"]: r for r in read_table(out, "runs").to_pylist()}
    assert runs["r1"]["stream"] == "cam"

    # 5 objects added: exactly those 5 are segmented.
    added = [_put(camera, f"img_{i:03d}", seed=i) for i in range(3, 8)]
    result = _run(camera, model, out, "r2")
    assert (result.num_images, result.unchanged) == (5, 3)
    assert _run_uris(out, "r2") == added
    assert len(_latest(out)) == 8

    # One object rewritten: it alone, and the view shows its new version.
    old_version = _latest(out)[first[0]]["image_version"]
    _put(camera, "img_000", seed=100)
    result = _run(camera, model, out, "r3")
    assert result.num_images == 1
    assert _run_uris(out, "r3") == [first[0]]
    latest = _latest(out)
    assert len(latest) == 8
    assert latest[first[0]]["run_id"] == "r3"
    assert latest[first[0]]["image_version"] != old_version

    # One object deleted: nothing to segment; it leaves the view, its rows stay in history.
    delete(first[1])
    result = _run(camera, model, out, "r4")
    assert result.num_images == 0
    latest = _latest(out)
    assert len(latest) == 7 and first[1] not in latest
    history = read_table(out, "predictions")["image_uri"].to_pylist()
    assert history.count(first[1]) == 1

    # Two more objects; the driver is killed after one prediction, the rerun completes.
    more = [_put(camera, f"img_{i:03d}", seed=i) for i in range(8, 10)]
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_TMPDIR": ray_tmp}
    args = [
        FCNPIPE, "segment", camera, "--model", model, "--output", out, "--stream", "cam",
        "--run-id", "r5", "--batch-size", "1", "--rows-per-file", "1", "--num-cpus", "2",
        "--backend", "torch", "--fail-after", "1",
    ]  # fmt: skip
    killed = subprocess.run(args, capture_output=True, text=True, env=env)
    assert killed.returncode == 1 and "fault injection" in killed.stdout, killed.stderr[-3000:]
    assert list_files(join(out, "predictions", "data", "run_id=r5"))  # staged, not committed
    result = _run(camera, model, out, "r5")
    assert result.num_images == 2 and result.skipped >= 1
    assert _run_uris(out, "r5") == more
    latest = _latest(out)
    assert len(latest) == 9
    history = read_table(out, "predictions")["image_uri"].to_pylist()
    assert sorted(history) == sorted([*first, *added, first[0], *more])  # no duplicate

    # Another model for the stream: everything is segmented again.
    other = join(root, "models", "other")
    for info in list_files(model):
        write_bytes(join(other, info.relpath), read_bytes(info.uri))
    result = _run(camera, other, out, "r6")
    assert (result.num_images, result.unchanged) == (9, 0)
    latest = _latest(out)
    assert len(latest) == 9 and {row["run_id"] for row in latest.values()} == {"r6"}


def test_scheduled_stream_has_a_one_slot_limit_and_a_triggered_run_completes(
    tmp_path: Path, prefect_api: PrefectServer
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from flows.pipelines import stream_limit_name

    camera, out = str(tmp_path / "camera"), str(tmp_path / "out")
    for i in range(2):
        _put(camera, f"img_{i}", seed=i)
    model = _model(str(tmp_path))
    command = [
        FCNPIPE, "schedule", "segment", camera, "--model", model, "--output", out,
        "--stream", "cam", "--cron", "*/15 * * * *", "--name", "stream-test", "--num-cpus", "2",
        "--backend", "torch", "--actors", "1",
    ]  # fmt: skip
    env = {**os.environ, **prefect_api.env(), "OMP_NUM_THREADS": "1"}
    log_path = tmp_path / "serve.log"
    log = log_path.open("wb")
    serving = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deployment = None
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while deployment is None and time.monotonic() < deadline:
                assert serving.poll() is None, log_path.read_text()[-3000:]
                try:
                    deployment = client.read_deployment_by_name("fcnpipe-segment/stream-test")
                except Exception:  # not registered yet
                    time.sleep(1)
            assert deployment is not None, log_path.read_text()[-3000:]
            (schedule,) = deployment.schedules
            assert schedule.schedule.cron == "*/15 * * * *"  # type: ignore[union-attr]
            assert deployment.parameters["config"]["stream"] == "cam"
            config = make(SegmentConfig, input_uri=camera, model_uri=model, output_uri=out)
            limit = client.read_global_concurrency_limit_by_name(
                stream_limit_name(replace(config, stream="cam"))
            )
            assert limit.limit == 1  # one active run per stream

        flow_run = run_deployment("fcnpipe-segment/stream-test", timeout=480)

        assert flow_run.state is not None and flow_run.state.is_completed(), log_path.read_text()[
            -5000:
        ]
        (run_id,) = committed_runs(out)
        (row,) = read_table(out, "runs", [run_id]).to_pylist()
        assert (row["stream"], row["num_images"]) == ("cam", 2)
    finally:
        os.killpg(serving.pid, signal.SIGINT)
        try:
            serving.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(serving.pid, signal.SIGKILL)
            serving.wait()
        log.close()


def test_bench_incremental_segments_only_the_added(ray_local: None, tmp_path: Path) -> None:
    from pipeline.bench.incremental import bench_incremental, format_bench_incremental

    result = bench_incremental(
        num_objects=3, added=1, size=32, root=str(tmp_path), echo=lambda _: None
    )
    assert (result["full_images"], result["incremental_images"]) == (3, 1)
    assert result["unchanged"] == 3 and result["listing_s_per_1000"] > 0
    assert result["unchanged_s"] > 0
    assert "incremental / full" in format_bench_incremental(result)
