"""Segmentation on a multi-node local Ray cluster (``ray.cluster_utils.Cluster``): a worker
node removed mid-run still leaves exactly one ``predictions`` row per good image.

The cluster runs in a subprocess: one process joins one Ray cluster, and this session's
tests share another (``ray_local``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.tables import read_table

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path

    import ray
    import torch
    from ray.cluster_utils import Cluster

    from fcn.models import build_model
    from fcn.synthetic import CLASS_NAMES
    from pipeline.artifacts import ModelCard, save_model
    from pipeline.datasets import write_synthetic
    from pipeline.infer import SegmentConfig, segment

    work = Path(sys.argv[1])
    data, out = str(work / "data"), str(work / "out")
    write_synthetic(data, num_images=80, size=96, seed=9, val_fraction=0.0)
    (work / "data" / "JPEGImages" / "shapes_000007.jpg").write_bytes(b"not an image")
    torch.manual_seed(0)
    model_uri = str(work / "model")
    save_model(
        build_model("fcn8s_resnet18", 6),
        ModelCard(run_id="m", architecture="fcn8s", backbone="resnet18", num_classes=6,
                  class_names=list(CLASS_NAMES), normalization={"name": "imagenet"}),
        model_uri,
    )

    # A head without CPUs (the driver only) and two worker nodes with separate raylets.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=3) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    ray.data.DataContext.get_current().enable_progress_bars = False

    partition = Path(out) / "predictions" / "run_id=node"
    removed = {}

    def remove_when_running():
        while not list(partition.glob("part-*.parquet")):
            time.sleep(0.02)
        cluster.remove_node(workers[1])
        removed["at"] = time.monotonic()

    killer = threading.Thread(target=remove_when_running, daemon=True)
    killer.start()
    result = segment(SegmentConfig(
        input_uri=data, model_uri=model_uri, output_uri=out, run_id="node",
        batch_size=2, actors=2, cpus_per_actor=1, rows_per_file=2,
    ))
    returned_at = time.monotonic()
    killer.join(timeout=60)
    report = {"removed_before_end": removed.get("at", 1e18) < returned_at,
              "num_images": result.num_images, "num_errors": result.num_errors}
    print("RESULT " + json.dumps(report))
    ray.shutdown()
    cluster.shutdown()
    """
)


def test_worker_node_removed_mid_run_loses_and_doubles_nothing(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    report = json.loads(line.removeprefix("RESULT "))
    assert report["removed_before_end"], "the node was removed while the run was going"
    assert (report["num_images"], report["num_errors"]) == (79, 1)

    out = str(tmp_path / "out")
    ids = read_table(out, "predictions")["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 79  # every good image once, none twice
    errors = read_table(out, "errors").to_pylist()
    assert [e["image_id"] for e in errors] == ["shapes_000007"]
