"""``fcnpipe train`` and ``fcnpipe segment`` as Ray jobs on a multi-node ``ray start`` cluster.

The cluster is a head and three worker nodes on 127.0.0.1: separate raylets and object stores,
token auth. As on KubeRay (``infra/kuberay``), the head offers no CPUs: it runs the GCS,
the dashboard and the job drivers, and all the work goes to the worker nodes, which offer
two logical CPUs each on this 2-core machine (a simulation: a node offers more CPUs than it
has, so a job sees the shape of a bigger cluster; each training worker or inference actor
takes one, with one torch thread). Jobs go in through the Jobs API
with ``flows.ray_jobs.run_job`` (the path the Prefect flows take with ``--ray-address``);
the data and outputs live on the SeaweedFS server. What a user relies on:

- training workers and inference actors spread over the nodes (the placement, from Ray's
  state API, is printed in the test log);
- a worker node lost mid-training costs at most an epoch: the workers restart on the nodes
  left, from the latest checkpoint (Ray rebuilds the decoded blocks the node held from
  their lineage), and the run completes with each epoch once;
- a worker node lost mid-segmentation, tiled (each image's strips on both nodes), loses
  nothing and doubles nothing: one ``predictions`` row per good image, each label map
  whole, the bad image in ``errors``.
"""

from __future__ import annotations

import io
import json
import shlex
import shutil
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from fcn.models import build_model
from fcn.synthetic import CLASS_NAMES
from flows.ray_jobs import RayJob, connect, run_job
from infra.local.ray_cluster import LocalRayCluster
from infra.local.seaweedfs import SeaweedS3
from pipeline.artifacts import ModelCard, load_artifact, save_model
from pipeline.data.synthetic import write_synthetic
from pipeline.faults import Faults
from pipeline.storage import exists, join, list_files, write_bytes
from pipeline.store.read import committed_runs, read_table

pytestmark = pytest.mark.integration

WORKER_NODES = ("w1", "w2", "w3")
TRAIN_WORKER = "RayTrainWorker"
INFER_ACTOR = "MapWorker"  # Ray Data's actor around the Segmenter
JOB_TIMEOUT_S = 200
GOOD_IMAGES = 47  # in the segmentation input, besides one that is not an image


class Cluster:
    """A running ``LocalRayCluster`` plus the names of its worker nodes."""

    def __init__(self, ray: LocalRayCluster) -> None:
        self.ray = ray
        self.nodes: dict[str, Any] = {}

    def add(self, name: str) -> None:
        """A worker node with 2 CPUs, tagged with the custom resource ``n_<name>``, joined.

        Nodes join one at a time: ``ray start`` gives a raylet 30 s to register, which two
        nodes starting at once on a loaded 2-core machine can miss; a node that did is
        started once more.
        """
        for attempt in range(3):
            node = self.ray.add_node(num_cpus=2, resources=json.dumps({f"n_{name}": 1}))
            deadline = time.monotonic() + 90
            while name not in self.node_names().values() and node.poll() is None:
                assert time.monotonic() < deadline, f"node {name} did not join in 90 s"
                time.sleep(0.5)
            if node.poll() is None:
                self.nodes[name] = node
                return
            log = self.ray.log_tail(f"node{len(self.ray.nodes) - 1}")
            print(f"node {name} exited at start (attempt {attempt + 1}):\n{log}")
        raise AssertionError(f"node {name} could not start")

    def kill(self, name: str) -> None:
        self.ray.kill_node(self.nodes.pop(name))

    def state(self, kind: str, **filters: str) -> list[dict[str, Any]]:
        """Rows of Ray's state API (``/api/v0/<kind>``), filtered by equality."""
        query: list[tuple[str, str]] = [("limit", "1000"), ("detail", "true")]
        for key, value in filters.items():
            query += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
        request = urllib.request.Request(
            f"{self.ray.dashboard_url}/api/v0/{kind}?{urllib.parse.urlencode(query)}",
            headers={"Authorization": f"Bearer {self.ray.token}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.load(response)
        rows: list[dict[str, Any]] = body["data"]["result"]["result"]
        return rows

    def node_names(self, alive: bool = True) -> dict[str, str]:
        """Node id -> ``head`` or the worker's name, for the nodes alive now (or ever)."""
        names = {}
        for node in self.state("nodes", **({"state": "ALIVE"} if alive else {})):
            tags = [k[2:] for k in node["resources_total"] if k.startswith("n_")]
            names[node["node_id"]] = "head" if node["is_head_node"] else (tags or ["?"])[0]
        return names

    def placement(self, class_name: str, alive: bool = True) -> list[str]:
        """Sorted node names of the actors (alive now, or ever) whose class name contains
        ``class_name``."""
        names = self.node_names(alive=False)
        actors = self.state("actors", **({"state": "ALIVE"} if alive else {}))
        hosts = [names.get(a["node_id"], "?") for a in actors if class_name in a["class_name"]]
        return sorted(hosts)

    def snapshot(self) -> str:
        """The cluster now, for a failure message: nodes, live actors, unfinished tasks."""
        names = self.node_names()
        lines = [f"nodes: {sorted(names.values())}"]
        for actor in self.state("actors", state="ALIVE"):
            lines.append(f"actor {actor['class_name']} on {names.get(actor['node_id'])}")
        for task in self.state("tasks"):
            if task["state"] not in ("FINISHED", "FAILED"):
                node = names.get(task.get("node_id") or "", "-")
                needs = task.get("required_resources")
                lines.append(f"task {task['name']} {task['state']} on {node} {needs}")
        return "\n".join(lines)


@pytest.fixture
def cluster(ray_node_env: dict[str, str]) -> Iterator[Cluster]:
    """A head without CPUs and three worker nodes with 2 CPUs each."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    # A node that stops answering is declared dead within about 5 s (Ray's default: ~30 s).
    fast_death = {
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "2000",
        "RAY_health_check_failure_threshold": "5",
    }
    try:
        with LocalRayCluster(temp_dir, head_cpus=0, env={**ray_node_env, **fast_death}) as ray:
            nodes = Cluster(ray)
            for name in WORKER_NODES:
                nodes.add(name)
            yield nodes
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, job_id: str, argv: list[str]
) -> tuple[threading.Thread, dict[str, Any], list[str]]:
    """Run ``fcnpipe ARGV`` as the Ray job ``job_id`` in a thread; returns the thread, a dict
    that gets the ``RayJob`` (or the exception: a failed job raises) and the job's log."""
    for key, value in cluster.ray.env().items():
        monkeypatch.setenv(key, value)
    client = connect(cluster.ray.dashboard_url)
    outcome: dict[str, Any] = {}
    lines: list[str] = []

    def follow() -> None:
        try:
            outcome["job"] = run_job(
                client, job_id, shlex.join(["fcnpipe", *argv]), log=lines.append
            )
        except Exception as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    return thread, outcome, lines


def _wait_for(
    what: str,
    ready: Callable[[], bool],
    thread: threading.Thread,
    lines: list[str],
    timeout_s: float,
) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert thread.is_alive(), f"the job ended before {what}:\n" + "\n".join(lines[-60:])
        assert time.monotonic() < deadline, f"no {what} in {timeout_s:.0f} s:\n" + "\n".join(
            lines[-60:]
        )
        time.sleep(0.5)


def _finished(
    cluster: Cluster, thread: threading.Thread, outcome: dict[str, Any], lines: list[str]
) -> RayJob:
    thread.join(timeout=JOB_TIMEOUT_S)
    log = "\n".join(lines)
    if thread.is_alive():
        pytest.fail(
            f"the job did not end in {JOB_TIMEOUT_S} s:\n{log[-6000:]}\n{cluster.snapshot()}"
        )
    assert "error" not in outcome, f"{outcome.get('error')!r}\n{log[-4000:]}"
    job: RayJob = outcome["job"]
    return job


def test_train_and_segment_jobs_survive_a_lost_worker_node(
    cluster: Cluster,
    s3_env: SeaweedS3,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data, inbox, out = (f"s3://{bucket}/{name}" for name in ("shapes", "inbox", "out"))
    write_synthetic(data, num_images=16, size=64, seed=5, val_fraction=0.25)
    write_synthetic(inbox, num_images=GOOD_IMAGES + 1, size=64, seed=6, val_fraction=0.0)
    # Staged training, as the paper trains: FCN-16s from an FCN-32s artifact.
    coarse = join(out, "models", "coarse")
    save_model(
        build_model("fcn32s_resnet18", 6),
        ModelCard(
            run_id="coarse",
            architecture="fcn32s",
            backbone="resnet18",
            num_classes=6,
            class_names=list(CLASS_NAMES),
            normalization={"name": "imagenet"},
        ),
        coarse,
    )
    write_bytes(join(inbox, "JPEGImages/shapes_000007.jpg"), b"not an image")

    # Training: 2 workers spread over two nodes; one of them dies after the first checkpoint.
    # Rank 0 stalls at the start of epoch 1 once epoch 0's checkpoint is registered (the
    # hidden fault hook), so the node dies mid-training however fast the epochs run.
    train_faults = Faults(root=join(out, "_faults", "multinode"))
    thread, outcome, lines = _submit(cluster, monkeypatch, "fcnpipe-train-multinode", [
        "train", data, "--output", out, "--run-id", "multinode", "--epochs", "3",
        "--model", "fcn16s", "--init-from", coarse,
        "--crop-size", "64", "--batch-size", "4", "--optimizer", "adamw", "--lr", "1e-3",
        "--num-workers", "2", "--cpus-per-worker", "1", "--threads-per-worker", "1",
        "--placement-strategy", "SPREAD", "--shuffle", "blocks", "--max-failures", "2",
        "--fail-at", "0:1:0:stall",
    ])  # fmt: skip
    _wait_for(
        "two training workers",
        lambda: len(cluster.placement(TRAIN_WORKER)) == 2,
        thread, lines, 240,
    )  # fmt: skip
    first = cluster.placement(TRAIN_WORKER)
    print(f"training workers on: {first}")
    assert len(set(first)) == 2, f"SPREAD puts the two workers on two nodes: {first}"
    _wait_for("a stalled rank at epoch 1", lambda: bool(train_faults.stalled()), thread, lines, 240)
    cluster.kill(first[0])
    train_faults.release()  # a stalled rank on the node left goes on (and fails to sync)
    print(f"killed worker node {first[0]}")
    job = _finished(cluster, thread, outcome, lines)
    log = "\n".join(lines)
    workers = cluster.placement(TRAIN_WORKER, alive=False)
    print(f"training job {job.submission_id} succeeded in {job.seconds:.0f} s; workers: {workers}")
    # The driver's own summary (the workers' "resumed after epoch N" lines travel through
    # Ray's best-effort log forwarding from their nodes, and may be missing).
    assert "(resumed)" in log, log[-4000:]

    assert committed_runs(out) == ["multinode"]
    training = read_table(out, "training").to_pylist()
    assert sorted(row["epoch"] for row in training) == [0, 1, 2]  # no epoch twice
    (run,) = read_table(out, "runs").to_pylist()
    assert run["kind"] == "train" and run["num_images"] == 12
    model_uri = run["model_uri"]
    _, card = load_artifact(model_uri)
    assert (card.run_id, card.architecture, card.parent_model_uri) == (
        "multinode",
        "fcn16s",
        coarse,
    )

    # Segmentation sized by fcnpipe (pipeline.plan): an actor on each of the two nodes left;
    # once an actor has segmented two images, its node dies.
    partition = join(out, "predictions/data/run_id=inbox")

    def written() -> int:
        return len(list_files(partition)) if exists(partition) else 0

    segment_faults = Faults(root=join(out, "_faults", "inbox"))
    thread, outcome, lines = _submit(cluster, monkeypatch, "fcnpipe-segment-multinode", [
        "segment", inbox, "--model", model_uri, "--output", out, "--run-id", "inbox",
        "--batch-size", "1", "--rows-per-file", "1", "--stall-actors-after", "2",
        "--backend", "onnxruntime",  # the artifact's ONNX export, made by the driver first
        # Tiled: each 64 px image is two strips of two windows, so an image's strips go to
        # both actors, and the lost node takes strips of images in flight with it.
        "--tile", "48", "--overlap", "8",
    ])  # fmt: skip
    # Each actor stalls before its third image (the hidden fault hook) until released: the
    # node of the first one stalled dies with that image in flight, however fast the model.
    # The second actor may still be starting when the first stalls (a stalled actor holds
    # its image, so the others stay queued for it): wait for both conditions, not one.
    stalled: dict[str, Any] = {}
    alive = sorted(n for n in cluster.node_names().values() if n != "head")

    def stalled_and_spread() -> bool:
        stalled.update(segment_faults.stalled())
        return bool(stalled) and cluster.placement(INFER_ACTOR) == alive

    _wait_for(
        f"a stalled inference actor and an actor on every worker node {alive}",
        stalled_and_spread, thread, lines, 240,
    )  # fmt: skip
    actors = cluster.placement(INFER_ACTOR)
    victim = cluster.node_names()[str(next(iter(stalled.values()))["node_id"])]
    cluster.kill(victim)
    segment_faults.release()
    done = written()
    print(f"inference actors on {actors}; killed {victim} after {done} predictions files")
    assert done < GOOD_IMAGES, "the node died mid-run"
    job = _finished(cluster, thread, outcome, lines)
    print(f"segmentation job {job.submission_id} succeeded in {job.seconds:.0f} s")
    assert "segment: 2 actor(s) x 1.75 CPUs x 2 threads" in "\n".join(lines), lines[-40:]
    assert read_table(out, "runs", run_ids=["inbox"])["engine"][0].as_py().startswith("onnxruntime")

    predictions = read_table(out, "predictions", run_ids=["inbox"]).to_pylist()
    ids = [row["image_id"] for row in predictions]
    assert len(ids) == len(set(ids)) == GOOD_IMAGES  # every good image once, none twice
    for row in predictions:  # every label map whole, assembled from its strips
        assert Image.open(io.BytesIO(row["label_map"])).size == (64, 64)
        assert sum(row["class_pixel_counts"]) == 64 * 64
    assert not list_files(join(out, "label_maps", "run_id=inbox", "_parts"))
    errors = read_table(out, "errors", run_ids=["inbox"]).to_pylist()
    assert [e["image_id"] for e in errors] == ["shapes_000007"]
    assert sorted(committed_runs(out)) == ["inbox", "multinode"]
