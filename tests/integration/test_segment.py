"""pipeline.segment on a real local Ray (actor pool) and real storage (local files and S3).

What a user relies on: every input object ends in exactly one of predictions or errors;
the label maps are the model's argmax; the run's metrics are what one recomputes from the
label maps and the masks; the tables read back with pyarrow and DuckDB; a crashed run
completes with the same id, without a duplicate row.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcn.metrics import confusion_matrix, scores
from fcn.models import build_model
from fcn.palette import decode_label_png
from fcn.synthetic import CLASS_NAMES
from fcn.transforms import eval_transform
from infra.local.seaweedfs import SeaweedS3
from pipeline.artifacts import ModelCard, save_model
from pipeline.config import make
from pipeline.data.batches import samples_from_batch
from pipeline.data.layouts import load_manifest
from pipeline.data.reading import DatasetConfig, load_batch
from pipeline.data.synthetic import write_synthetic
from pipeline.faults import Faults
from pipeline.segment.config import SegmentConfig
from pipeline.segment.driver import segment
from pipeline.storage import join, list_files, read_bytes, write_bytes
from pipeline.store.read import committed_runs, duckdb_connection, read_table
from pipeline.tables import RunExistsError
from tests.cli import FCNPIPE, fcnpipe_in_process

pytestmark = pytest.mark.integration


def _model(root: str) -> str:
    """A small FCN whose predictions vary across classes (random score layers)."""
    torch.manual_seed(0)
    model = build_model("fcn8s_resnet18", len(CLASS_NAMES))
    with torch.no_grad():
        for name in ("score_fr", "score_pool4", "score_pool3"):
            conv = model.head.get_submodule(name)
            assert isinstance(conv, torch.nn.Conv2d) and conv.bias is not None
            conv.weight.normal_(std=0.05)
            conv.bias.normal_(std=0.5)
    uri = join(root, "models", "m")
    card = ModelCard(
        run_id="m",
        architecture="fcn8s",
        backbone="resnet18",
        num_classes=len(CLASS_NAMES),
        class_names=list(CLASS_NAMES),
        normalization={"name": "imagenet"},
    )
    save_model(model, card, uri)
    return uri


def _dataset(root: str, num_images: int = 10) -> tuple[str, str]:
    """A VOC dataset of ``num_images`` whose image 3 is corrupt; returns (root, bad uri)."""
    data = join(root, "shapes")
    write_synthetic(data, num_images=num_images, size=48, seed=5, val_fraction=0.0)
    bad = join(data, "JPEGImages", "shapes_000003.jpg")
    write_bytes(bad, b"\xff\xd8\xff\xe0 not really a jpeg")
    return data, bad


def test_segment_writes_exact_tables(storage_root: str, ray_local: None) -> None:
    data, bad = _dataset(storage_root)
    model_uri = _model(storage_root)
    out = join(storage_root, "out")
    mirror = join(storage_root, "pngs")
    result = segment(
        make(
            SegmentConfig,
            input_uri=data,
            model_uri=model_uri,
            output_uri=out,
            run_id="seg1",
            batch_size=1,  # the reference below runs one image at a time, on one thread
            actors=1,
            cpus_per_actor=0.5,
            write_png=mirror,
            # As the reference (other engines and precisions: tests/unit/test_compute.py).
            backend="torch",
            precision="fp32",
            memory_format="contiguous",
        )
    )
    assert committed_runs(out) == ["seg1"]
    assert (result.num_images, result.num_errors) == (9, 1)

    # Every input object in exactly one of predictions or errors.
    predictions = read_table(out, "predictions").to_pylist()
    errors = read_table(out, "errors").to_pylist()
    ids = sorted([r["image_id"] for r in predictions] + [r["image_id"] for r in errors])
    assert ids == [f"shapes_{i:06d}" for i in range(10)]
    assert [e["image_uri"] for e in errors] == [bad]
    assert errors[0]["stage"] == "decode_image" and errors[0]["message"]

    # The label maps are the model's argmax, image by image.
    from pipeline.artifacts import load_model

    model = load_model(model_uri)
    samples = {
        s.image_id: s
        for s in samples_from_batch(
            load_batch(load_manifest(data), config=DatasetConfig(), num_classes=6)
        )
    }
    to_input = eval_transform()
    total = np.zeros((6, 6), dtype=np.int64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actor (0.5 CPU): the same float reductions
    for row in predictions:
        sample = samples[row["image_id"]]
        label = decode_label_png(row["label_map"])
        with torch.inference_mode():
            direct = model(to_input(sample.image, None)[0][None]).argmax(1)[0].numpy()
        np.testing.assert_array_equal(label, direct)
        assert (row["height"], row["width"]) == label.shape
        assert row["class_pixel_counts"] == np.bincount(label.ravel(), minlength=6).tolist()
        assert row["model_uri"] == model_uri
        assert read_bytes(join(mirror, f"{row['image_id']}.png")) == row["label_map"]
        assert sample.mask is not None
        total += confusion_matrix(label, sample.mask, 6)
    torch.set_num_threads(threads)

    # The run's metrics: recomputed independently from the label maps and the masks.
    (run,) = read_table(out, "runs").to_pylist()
    expected = scores(total)
    assert run["kind"] == "segment" and run["num_images"] == 9 and run["num_errors"] == 1
    for key in ("pixel_acc", "mean_acc", "mean_iou", "fw_iou"):
        assert run[key] == pytest.approx(expected[key]), key
    iou = [None if np.isnan(v) else pytest.approx(v) for v in expected["iou"]]
    assert run["class_iou"] == iou
    # How the run was sized (pipeline.plan) is in the Iceberg runs table: the write tasks
    # take turns with the reads in their share.
    assert run["plan"].startswith("segment: 1 actor(s) x 0.5 CPUs x 1 threads"), run["plan"]
    assert "reads and writes 0.25 CPU" in run["plan"]

    # class_metrics summed per class gives class_iou, in DuckDB as in pyarrow.
    con = duckdb_connection(out)
    sums = con.execute(
        'SELECT class_id, sum(intersection) / sum("union") FROM class_metrics '
        "WHERE run_id = 'seg1' GROUP BY class_id ORDER BY class_id"
    ).fetchall()
    for class_id, value in sums:
        assert run["class_iou"][class_id] == pytest.approx(value)
    absent = [i for i, v in enumerate(run["class_iou"]) if v is None]
    assert all(class_id not in absent for class_id, _ in sums)
    (count,) = con.execute("SELECT count(*) FROM predictions").fetchone()  # type: ignore[misc]
    assert count == 9


def test_images_only_prefix_and_overwrite(tmp_path: Path, ray_local: None) -> None:
    data, _ = _dataset(str(tmp_path), num_images=4)
    images_only = str(tmp_path / "flat")
    for info in list_files(join(data, "JPEGImages")):
        write_bytes(join(images_only, "a", info.relpath), read_bytes(info.uri))
    model_uri = _model(str(tmp_path))
    out = str(tmp_path / "out")
    config = make(
        SegmentConfig,
        input_uri=images_only,
        model_uri=model_uri,
        output_uri=out,
        run_id="flat",
        backend="torch",  # engines: tests/unit/test_compute.py
    )
    first = segment(config)
    assert first.scores is None and (first.num_images, first.num_errors) == (3, 1)
    assert read_table(out, "class_metrics").num_rows == 0
    (run,) = read_table(out, "runs").to_pylist()
    assert run["mean_iou"] is None and run["num_images"] == 3
    assert sorted(read_table(out, "predictions")["image_id"].to_pylist()) == [
        "a/shapes_000000",
        "a/shapes_000001",
        "a/shapes_000002",
    ]
    with pytest.raises(RunExistsError, match="--overwrite"):
        segment(config)
    again = segment(replace(config, overwrite=True))
    assert again.num_images == 3 and read_table(out, "predictions").num_rows == 3


# A client that knows nothing of fcnpipe: pyiceberg and Polars, given `fcnpipe tables info
# --json`. Prints, per table, what each engine reads of one run.
_EXTERNAL_CLIENT = """
import json, sys, warnings
import polars as pl
from pyiceberg.catalog import load_catalog

warnings.simplefilter("ignore")  # Polars suggests its faster Iceberg planner plugin
info, run_id = json.loads(sys.argv[1]), sys.argv[2]
catalog = load_catalog(info["name"], **info["properties"])
seen = {}
for table, key in (("predictions", "image_id"), ("errors", "image_id"),
                   ("class_metrics", "image_id"), ("runs", "run_id")):
    tbl = catalog.load_table(info["tables"][table])
    rows = tbl.scan(row_filter=f"run_id == '{run_id}'", selected_fields=(key,)).to_arrow()
    frame = pl.scan_iceberg(tbl).filter(pl.col("run_id") == run_id).select(key).collect()
    seen[table] = {"pyiceberg": sorted(rows[key].to_pylist()),
                   "polars": sorted(frame[key].to_list())}
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("fcn", "pipeline", "flows"))
assert not ours, ours
print(json.dumps(seen))
"""


def _external_read(info: str, run_id: str) -> dict[str, list[str]]:
    """What pyiceberg and Polars, in a process without fcnpipe, read of a run (they agree)."""
    client = subprocess.run(
        [sys.executable, "-c", _EXTERNAL_CLIENT, info, run_id],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",  # not the checkout: nothing of fcnpipe on the path but the installed package
    )
    assert client.returncode == 0, client.stderr[-3000:]
    seen = json.loads(client.stdout)
    for table, engines in seen.items():
        assert engines["pyiceberg"] == engines["polars"], table
    return {table: engines["pyiceberg"] for table, engines in seen.items()}


def test_killed_run_completes_with_the_same_id(
    s3_env: SeaweedS3, bucket: str, ray_local: None
) -> None:
    """A driver killed mid-run on S3 leaves nothing of the run visible to any engine; the
    rerun completes it without redoing the images in files, one row per image, and external
    clients (pyiceberg, Polars) read exactly the rows fcnpipe reports."""
    root = f"s3://{bucket}"
    data, _ = _dataset(root, num_images=24)
    model_uri = _model(root)
    out = join(root, "out")
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_TMPDIR": ray_tmp}
    args = [
        FCNPIPE, "segment", data, "--model", model_uri, "--output", out, "--batch-size", "2",
        "--rows-per-file", "2", "--num-cpus", "2", "--backend", "torch",
    ]  # fmt: skip
    # The driver dies abruptly (os._exit, as a kill would) once 6 predictions are in files.
    first = subprocess.run(
        [*args, "--run-id", "crash", "--fail-after", "6"], capture_output=True, text=True, env=env
    )
    assert first.returncode == 1 and "fault injection" in first.stdout, first.stderr[-3000:]
    staged = list_files(join(out, "predictions", "data", "run_id=crash"))
    assert len(staged) >= 3, "data files of two rows were written before the crash"
    assert committed_runs(out) == []  # a crash leaves nothing visible: to us,
    info = fcnpipe_in_process("tables", "info", out, "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["properties"]["warehouse"] == out
    crashed = _external_read(info.stdout, "crash")
    assert crashed == {"predictions": [], "errors": [], "class_metrics": [], "runs": []}  # nor
    # to any other engine.

    rerun = subprocess.run([*args, "--run-id", "crash"], capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already written by an earlier attempt" in rerun.stdout
    shutil.rmtree(ray_tmp, ignore_errors=True)
    # The reference: the same job never cut, in this process (on the session's Ray).
    segment(
        make(SegmentConfig,
            input_uri=data, model_uri=model_uri, output_uri=out, run_id="whole", batch_size=2,
            rows_per_file=2, backend="torch",
        )
    )  # fmt: skip

    predictions = read_table(out, "predictions", ["crash"])
    ids = predictions["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 23  # one row per good image, none twice
    assert read_table(out, "errors", ["crash"]).num_rows == 1
    runs = {r["run_id"]: r for r in read_table(out, "runs").to_pylist()}
    for key in ("num_images", "num_errors", "pixel_acc", "mean_iou", "class_iou"):
        assert runs["crash"][key] == runs["whole"][key], key
    metrics = read_table(out, "class_metrics", ["crash"])["image_id"].to_pylist()
    assert len(metrics) == read_table(out, "class_metrics", ["whole"]).num_rows
    completed = _external_read(info.stdout, "crash")
    assert completed == {
        "predictions": sorted(ids),
        "errors": ["shapes_000003"],
        "class_metrics": sorted(metrics),
        "runs": ["crash"],
    }


def test_bench_segment_reports_speed_stages_and_memory(ray_local: None, tmp_path: Path) -> None:
    from pipeline.bench.segment import bench_segment, format_bench_segment

    result = bench_segment(
        num_images=3,
        size=32,
        model="fcn32s_resnet18",
        scale=2,
        memory_size=32,
        backend="torch",
        reference=False,
        root=str(tmp_path / "bench"),
    )
    assert result["bare"] > 0 and result["full"] > 0
    assert result["ratio"] == pytest.approx(result["full"] / result["bare"])
    assert set(result["stages_ms"]) == {"model", "read+decode", "png"}
    assert [row["images"] for row in result["memory"]] == [3, 6]
    assert all(row["driver_mb"] > 0 and row["actors_mb"] > 0 for row in result["memory"])
    assert "b/a" in format_bench_segment(result)


def test_bench_tables_reports_both_designs(ray_local: None, tmp_path: Path) -> None:
    from pipeline.bench.tables import bench_tables, format_bench_tables

    result = bench_tables(num_images=120, size=64, rows_per_file=40, root=str(tmp_path))
    for way in ("before", "after"):
        assert result[way]["ceiling"] > 0 and result[way]["files"] >= 3, way
        assert result[way]["saturates_at"] == pytest.approx(result[way]["ceiling"] / 300)
    assert result["cpu"] and "(b) workers write" in format_bench_tables(result)
    assert sorted(committed_runs(str(tmp_path / "out"))) == ["after", "before"]


def test_s3_restart_mid_run_is_retried(
    s3_env: SeaweedS3, bucket: str, ray_local: None, tmp_path: Path
) -> None:
    root = f"s3://{bucket}"
    data, _ = _dataset(root, num_images=40)
    model_uri = _model(root)
    out = join(root, "out")
    outcome: dict[str, object] = {}
    # The actor stalls before its second batch until released (markers on local disk, which
    # the restart does not touch): the server is down while the run still has work to do.
    faults = Faults(root=str(tmp_path / "faults"), actor_stall_after=1)

    def run() -> None:
        try:
            outcome["result"] = segment(
                make(
                    SegmentConfig,
                    input_uri=data,
                    model_uri=model_uri,
                    output_uri=out,
                    run_id="hiccup",
                    batch_size=2,
                    rows_per_file=2,
                    backend="torch",  # engines: tests/unit/test_compute.py
                ),
                faults=faults,
            )
        except BaseException as exc:  # reported below, with its message
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 300
    while not faults.stalled():
        assert worker.is_alive(), f"the run ended before the actor stalled: {outcome}"
        assert time.monotonic() < deadline, "the actor did not stall in time"
        time.sleep(0.2)
    s3_env.stop()  # objects survive; every request meanwhile fails to connect
    faults.release()  # the run goes on while the server is down
    s3_env.start()
    worker.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    predictions = read_table(out, "predictions")["image_id"].to_pylist()
    assert len(predictions) == len(set(predictions)) == 39
    assert [e["image_id"] for e in read_table(out, "errors").to_pylist()] == ["shapes_000003"]


def _readme_onnx_client() -> str:
    """The ONNX Runtime client of the README (the code block after its marker)."""
    text = (Path(__file__).parents[2] / "README.md").read_text()
    block = text.split("<!-- onnx-client -->", 1)[1].split("```python\n", 1)[1]
    return block.split("```", 1)[0]


def test_the_readme_onnx_client_gets_the_label_maps_of_segment(
    tmp_path: Path, ray_local: None
) -> None:
    """`fcnpipe export` gives a graph a plain ONNX Runtime client (no fcnpipe, no torch)
    runs to the label maps `fcnpipe segment` writes (fp32: >= 99.9 % of pixels)."""
    data, _ = _dataset(str(tmp_path), num_images=4)
    model_uri = _model(str(tmp_path))
    exported = fcnpipe_in_process("export", model_uri)
    assert exported.returncode == 0 and "opset 18" in exported.stdout, exported.stderr
    out = str(tmp_path / "out")
    segment(
        make(
            SegmentConfig,
            input_uri=data,
            model_uri=model_uri,
            output_uri=out,
            run_id="served",
            backend="torch",
            precision="fp32",
            memory_format="contiguous",
        )
    )
    client = tmp_path / "client.py"
    client.write_text(_readme_onnx_client())
    same = total = 0
    for row in read_table(out, "predictions").to_pylist():
        target = tmp_path / f"{row['image_id']}.png"
        script = (
            "import runpy, sys\n"
            f"sys.argv = ['client.py', {model_uri + '/model.onnx'!r}, {row['image_uri']!r}, "
            f"{str(target)!r}]\n"
            f"runpy.run_path({str(client)!r}, run_name='__main__')\n"
            "assert 'torch' not in sys.modules, 'the client imported torch'\n"
        )
        run = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr[-2000:]
        theirs = np.asarray(Image.open(target))
        ours = decode_label_png(row["label_map"])
        same, total = same + int((theirs == ours).sum()), total + ours.size
    assert total > 0 and same / total >= 0.999, same / total


def test_an_error_inside_an_actor_reaches_the_user_as_one_line(
    tmp_path: Path, ray_local: None
) -> None:
    # Only the actors read the weights: a corrupted file fails each actor's __init__, which
    # Ray Data reports wrapped in its own errors and the worker's traceback.
    data, _ = _dataset(str(tmp_path), num_images=2)
    model_uri = _model(str(tmp_path))
    weights = Path(model_uri) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    out = str(tmp_path / "out")
    result = fcnpipe_in_process(
        "segment", data, "--model", model_uri, "--output", out, "--backend", "torch",
        env={"FCNPIPE_LOG_DIR": str(tmp_path / "logs")},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("error: the weights") and "SHA-256" in errors[0], errors
    assert "Traceback" not in result.stdout + result.stderr
    # The worker's traceback is in the log file the command named.
    (log,) = (tmp_path / "logs").glob("segment-*.log")
    assert f"log: {log}" in result.stdout
    assert "ArtifactError" in log.read_text()
