"""pipeline.train on a real local Ray (2 CPUs, 2 DDP workers over gloo) and real storage.

What a user relies on: two workers step exactly as one process on the whole batch; a
short run learns; its val metrics are those of one process scoring every val image; the
artifact loads and the tables are committed; a dead driver costs at most one epoch, never
the run; checkpoints live on the S3 server. (A dead worker node mid-training, and a staged
FCN-16s from FCN-32s: ``test_multinode.py``.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcn.engine import evaluate, train_step
from fcn.metrics import ConfusionMatrix
from fcn.models import build_model
from fcn.synthetic import CLASS_NAMES, make_sample
from fcn.transforms import eval_transform, train_transform
from infra.local.seaweedfs import SeaweedS3
from pipeline.artifacts import load_artifact
from pipeline.config import make
from pipeline.data.batches import samples_from_batch
from pipeline.data.layouts import load_manifest
from pipeline.data.reading import DatasetConfig, load_batch
from pipeline.data.synthetic import write_synthetic
from pipeline.faults import Faults, registered_epoch
from pipeline.storage import StorageOptions, exists, join, write_bytes
from pipeline.store.read import committed_runs, read_table
from pipeline.train.config import TrainConfig
from pipeline.train.driver import train
from tests.cli import FCNPIPE
from tests.images import encode

pytestmark = pytest.mark.integration

# Small and quick on 2 cores: two half-CPU workers leave one CPU to Ray Data.
WORKERS = {"num_workers": 2, "cpus_per_worker": 0.5, "threads_per_worker": 1}
# The checks below compare with one process in fp32 NCHW, float for float.
EXACT = {"precision": "fp32", "memory_format": "contiguous"}


def _write_full_label_dataset(root: str, num_images: int, size: int) -> list[str]:
    """A generic-layout dataset whose masks label every pixel (no ignore band)."""
    ids = [f"s{i:03d}" for i in range(num_images)]
    for i, image_id in enumerate(ids):
        image, mask = make_sample(i, size=size, seed=3, ignore_border=0)
        write_bytes(join(root, f"images/{image_id}.png"), encode(Image.fromarray(image), "PNG"))
        write_bytes(join(root, f"masks/{image_id}.png"), encode(Image.fromarray(mask), "PNG"))
    write_bytes(join(root, "splits/train.txt"), "\n".join(ids).encode())
    write_bytes(join(root, "classes.txt"), "\n".join(CLASS_NAMES).encode())
    return ids


def test_two_workers_step_like_one_process_on_the_whole_batch(
    tmp_path: Path, ray_local: None
) -> None:
    # VGG16 has no BatchNorm (whose batch statistics are per rank), dropout is off, the
    # transform is fixed and every pixel is labelled, so each rank's mean loss has the same
    # number of pixels and DDP's average of the two gradients is the whole batch's gradient.
    # Each rank also accumulates its two images as two micro-batches of one (grad_accum 2:
    # DDP's no_sync on the first, the all-reduce on the second), so this one step checks
    # gradient accumulation too.
    root = str(tmp_path / "data")
    size, per_worker = 32, 2
    _write_full_label_dataset(root, 2 * per_worker, size)
    config = make(
        TrainConfig,
        dataset_uri=root,
        output_uri=str(tmp_path / "out"),
        run_id="ddp",
        model="fcn32s",
        backbone="vgg16",
        dropout=0.0,
        val_split=None,
        crop_size=size,
        scale_range=(1.0, 1.0),
        hflip=False,
        batch_size=1,
        grad_accum=per_worker,
        epochs=1,
        optimizer="sgd",
        lr=0.5,
        momentum=0.0,
        weight_decay=0.0,
        schedule="constant",
        seed=7,
        **WORKERS,
        **EXACT,
    )
    result = train(config)
    trained, _ = load_artifact(result.model_uri)

    torch.manual_seed(config.optim.seed)  # the workers' initialisation
    reference = build_model("fcn32s_vgg16", len(CLASS_NAMES), backbone="vgg16", dropout=0.0)
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    decoded = load_batch(
        load_manifest(root, "train"), config=DatasetConfig(), num_classes=6, require_masks=True
    )
    fixed = train_transform(size, scale_range=(1.0, 1.0), hflip_prob=0.0)
    pairs = [fixed(s.image, s.mask) for s in samples_from_batch(decoded)]
    images = torch.stack([p[0] for p in pairs])
    masks = torch.stack([p[1] for p in pairs])
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    reference.train()
    train_step(reference, images, masks, optimizer)

    moved = 0.0
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[key], value, rtol=1e-4, atol=1e-6)
        moved = max(moved, float((value - initial[key]).abs().max()))
    assert moved > 1e-3, "the step changed the weights (else the comparison proves nothing)"


def test_short_run_learns_and_scores_val_like_one_process(tmp_path: Path, ray_local: None) -> None:
    root = str(tmp_path / "shapes")
    write_synthetic(root, num_images=64, size=80, seed=0, val_fraction=0.25)
    out = str(tmp_path / "out")
    config = make(
        TrainConfig,
        dataset_uri=root,
        output_uri=out,
        run_id="learn",
        model="fcn8s",
        backbone="resnet18",
        crop_size=80,
        scale_range=(0.75, 1.25),
        batch_size=4,
        epochs=8,
        optimizer="adamw",
        lr=2e-3,
        weight_decay=1e-4,
        **WORKERS,
        **EXACT,
    )
    result = train(config)

    # The exported model, scored by one process over every val image, gives the very
    # confusion matrix the two ranks all-reduced during training.
    model, card = load_artifact(result.model_uri)
    val = samples_from_batch(
        load_batch(load_manifest(root, "val"), config=DatasetConfig(), require_masks=True)
    )
    assert len(val) == 16
    to_input = eval_transform()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same float reductions
    try:
        confusion = evaluate(model, (to_input(s.image, s.mask) for s in val), 6)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(confusion.matrix, result.scores["confusion"])
    assert card.metrics["mean_iou"] == pytest.approx(confusion.scores()["mean_iou"])

    # Learning: well above predicting the majority class everywhere.
    trivial = ConfusionMatrix(6)
    for sample in val:
        mask = torch.from_numpy(sample.mask.astype(np.int64))
        trivial.update(torch.zeros_like(mask), mask)
    baseline = trivial.scores()["mean_iou"]
    assert result.scores["mean_iou"] > baseline + 0.1, (result.scores["mean_iou"], baseline)

    # Tables: committed, one training row per epoch, a runs row pointing at the model.
    assert committed_runs(out) == ["learn"]
    training = read_table(out, "training").to_pylist()
    assert sorted(row["epoch"] for row in training) == list(range(8))
    kept = {row["epoch"] for row in training if exists(row["checkpoint_uri"])}
    assert {result.epoch, 7} <= kept, "Ray Train keeps the best and the latest checkpoint"
    runs = read_table(out, "runs").to_pylist()
    assert len(runs) == 1 and runs[0]["kind"] == "train"
    assert runs[0]["model_uri"] == result.model_uri
    assert runs[0]["num_images"] == 48 and runs[0]["num_errors"] == 0
    assert runs[0]["mean_iou"] == pytest.approx(result.scores["mean_iou"])
    assert card.training_config["exported_epoch"] == result.epoch


def test_driver_killed_then_rerun_resumes_without_duplicates(
    s3_env: SeaweedS3, bucket: str, tmp_path: Path
) -> None:
    root = f"s3://{bucket}/shapes"
    out = f"s3://{bucket}/out"
    write_synthetic(root, num_images=16, size=64, seed=4, val_fraction=0.25)
    # One worker: two ranks resuming is the multi-node test's (a lost node); here the driver
    # and the Ray it started die, and each run pays Ray Train's start-up once.
    args = [
        FCNPIPE, "train", root, "--output", out, "--run-id", "crashy", "--epochs", "2",
        "--crop-size", "64", "--batch-size", "4", "--optimizer", "adamw", "--lr", "1e-3",
        "--num-workers", "1", "--cpus-per-worker", "1", "--threads-per-worker", "1",
        "--num-cpus", "2",
    ]  # fmt: skip
    # Ray's socket paths must stay under 107 bytes: a short temp dir of its own.
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_TMPDIR": ray_tmp}
    log = (tmp_path / "first.log").open("w")
    # Its own session: killing the group kills the driver and the Ray it started, as a
    # machine crash would.
    # The first run's worker stalls at the start of epoch 1 (the hidden fault hook), once
    # Ray Train has registered epoch 0's checkpoint, and says so with a marker: the kill lands
    # between epoch 0's checkpoint and epoch 1's however fast the epochs run, so the torn
    # epoch_0001 below cannot be a real checkpoint.
    first = subprocess.Popen(
        [*args, "--fail-at", "0:1:0:stall"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    faults = Faults(root=join(out, "_faults", "crashy"))
    deadline = time.monotonic() + 400
    try:
        while not faults.stalled():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the worker did not stall at epoch 1 in time"
            time.sleep(0.5)
        assert registered_epoch(join(out, "checkpoints", "crashy"), StorageOptions()) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        log.close()
    # A torn checkpoint from the crash must never be picked up.
    write_bytes(join(out, "checkpoints", "crashy", "epoch_0001", "state.pt"), b"torn")

    rerun = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resumed after epoch" in rerun.stdout + rerun.stderr
    training = read_table(out, "training").to_pylist()
    assert sorted(row["epoch"] for row in training) == [0, 1]
    assert "model:" in rerun.stdout and "(resumed)" in rerun.stdout
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_skips_experiment_trains_the_three_variants(tmp_path: Path, ray_local: None) -> None:
    from pipeline.experiments import SkipsExperiment, run_skips

    # A smoke-sized budget: the command's table comes from three real runs.
    results = run_skips(
        SkipsExperiment(
            output_uri=str(tmp_path / "out"), num_images=12, size=32, epochs=1, num_workers=1
        )
    )
    assert list(results) == ["fcn32s", "fcn16s", "fcn8s"]
    for head, result in results.items():
        _, card = load_artifact(result.model_uri)
        assert card.architecture == head and card.backbone == "resnet18"
        assert 0.0 <= result.scores["mean_iou"] <= 1.0
    assert committed_runs(str(tmp_path / "out")) == sorted(r.run_id for r in results.values())


def test_bench_train_reports_three_ways_and_ratios(ray_local: None) -> None:
    from pipeline.bench.train import bench_train, format_bench_train

    result = bench_train(num_images=8, size=32, batch_size=4, epochs=2, threads=2)
    for key in ("plain", "ray_1", "ray_2"):
        assert result[key] > 0
    assert result["overhead"] == pytest.approx(result["ray_1"] / result["plain"])
    assert result["scaling"] == pytest.approx(result["ray_2"] / result["ray_1"])
    text = format_bench_train(result)
    assert "b/a (Ray Train overhead)" in text and "c/b (DDP scaling" in text
