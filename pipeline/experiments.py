"""The paper's skip-architecture experiment, and the training benchmark.

Usage:
    fcnpipe experiment skips --output OUT [--num-images 400 --epochs 12]
    fcnpipe bench train [--num-images 64 --size 96 --epochs 3]
    fcnpipe bench segment [--num-images 24 --size 320 --model fcn8s_vgg16]

``run_skips`` trains FCN-32s, FCN-16s and FCN-8s with one backbone, one budget and one
dataset (the synthetic shapes unless a dataset is given) through the real training job, and
returns each variant's val scores for the paper-style table (paper, Table 2).

``bench_train`` measures training images/s of (a) a plain single-process PyTorch loop,
(b) Ray Train with one worker, (c) Ray Train with two workers on half the threads each:
same model, data, global batch and total threads, in one run, so the ratios (Ray's
overhead b/a, DDP scaling c/b) compare like with like.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcn.engine import train_step
from fcn.models import HEADS, build_model
from fcn.optim import build_optimizer
from fcn.transforms import train_transform
from pipeline.datasets import (
    DatasetConfig,
    Sample,
    load_batch,
    load_manifest,
    samples_from_batch,
    write_synthetic,
)
from pipeline.storage import join
from pipeline.train import TrainConfig, TrainResult, train

__all__ = [
    "SkipsExperiment",
    "bench_segment",
    "bench_train",
    "format_bench_segment",
    "format_bench_train",
    "run_skips",
]


@dataclass(frozen=True, kw_only=True)
class SkipsExperiment:
    """FCN-32s vs 16s vs 8s under one budget."""

    output_uri: str
    """Output root of the three training runs (and of the synthetic data if made)."""
    dataset_uri: str | None = None
    """Dataset to train on; None: write the synthetic shapes under ``OUT/dataset``."""
    num_images: int = 400
    """Synthetic images (train and val), when no dataset is given."""
    size: int = 128
    """Synthetic image side, when no dataset is given."""
    train: TrainConfig | None = None
    """Everything else of the runs (model is set per variant); None: the defaults below."""
    epochs: int = 12
    """Epochs per variant (when ``train`` is None)."""
    backbone: str = "resnet18"
    """Backbone of all three (when ``train`` is None)."""
    num_workers: int = 2
    """Workers per run (when ``train`` is None)."""
    seed: int = 0
    """Seed of the data and of every run."""

    def __post_init__(self) -> None:
        if self.num_images < 8 or self.size < 32 or self.epochs < 1 or self.num_workers < 1:
            raise ValueError("need num_images >= 8, size >= 32, epochs and workers >= 1")


def run_skips(
    experiment: SkipsExperiment, *, echo: Callable[[str], None] = print
) -> dict[str, TrainResult]:
    """Train the three variants one after the other; their results by head name.

    Args:
        experiment: What to train on and how long.
        echo: Where progress lines go.
    """
    dataset = experiment.dataset_uri
    if dataset is None:
        dataset = join(experiment.output_uri, "dataset")
        write_synthetic(
            dataset, num_images=experiment.num_images, size=experiment.size, seed=experiment.seed
        )
    base = experiment.train or TrainConfig(
        dataset_uri=dataset,
        output_uri=experiment.output_uri,
        backbone=experiment.backbone,
        crop_size=experiment.size,
        scale_range=(0.75, 1.25),
        batch_size=8,
        epochs=experiment.epochs,
        optimizer="adamw",
        lr=2e-3,
        weight_decay=1e-4,
        num_workers=experiment.num_workers,
        seed=experiment.seed,
    )
    results = {}
    for head in HEADS:
        run_id = f"skips-{head}-s{experiment.seed}"
        echo(f"training {head}_{base.backbone} as run {run_id}")
        config = replace(
            base, dataset_uri=dataset, model=head, run_id=run_id, overwrite=True, init_from=None
        )
        results[head] = train(config, echo=echo)
    return results


# ----------------------------------------------------------------------------- benchmark


def bench_train(
    *,
    num_images: int = 64,
    size: int = 96,
    model: str = "fcn8s_resnet18",
    batch_size: int = 8,
    epochs: int = 3,
    threads: int = 2,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Training images/s three ways on the same synthetic data; see the module docstring.

    Each way runs ``epochs`` epochs and reports the median of the epochs after the first
    (which pays start-up: worker processes, the first pass over the data). Ray's figures
    are the training loop's own (data wait included, validation and checkpointing not).

    Args:
        num_images: Synthetic training images.
        size: Their side (crops are the full image, so every step has the same work).
        model: ``fcn.models.build_model`` name.
        batch_size: Global batch (split between the two workers of (c)).
        epochs: Epochs per way (>= 2).
        threads: torch threads in all: (a) and (b) use them all, (c) half per worker.
        echo: Where progress lines go.

    Returns:
        ``{"plain": img/s, "ray_1": img/s, "ray_2": img/s, "overhead": ray_1 / plain,
        "scaling": ray_2 / ray_1, ...}`` plus the settings.
    """
    from pipeline.cluster import ensure_ray

    if epochs < 2 or threads < 2 or batch_size < 2:
        raise ValueError("bench_train needs epochs >= 2, threads >= 2 and batch_size >= 2")
    head, _, backbone = model.partition("_")
    with tempfile.TemporaryDirectory(prefix="fcnpipe-bench-train-") as tmp:
        data = str(Path(tmp) / "data")
        write_synthetic(data, num_images=num_images, size=size, val_fraction=0.0)
        echo(f"(a) plain PyTorch loop, {threads} threads, batch {batch_size}")
        plain = _plain_loop(data, model, size, batch_size, epochs, threads)
        # Ray's CPU reservations only place the workers (torch threads are set apart); they
        # leave a CPU to Ray Data, whose tasks feed the workers.
        ensure_ray(num_cpus=threads)
        base = TrainConfig(
            dataset_uri=data,
            output_uri=str(Path(tmp) / "out"),
            model=head,
            backbone=backbone or "resnet18",
            val_split=None,
            crop_size=size,
            scale_range=(1.0, 1.0),
            batch_size=batch_size,
            epochs=epochs,
            optimizer="sgd",
            lr=0.01,
            shuffle="blocks",
            max_failures=0,
        )
        echo(f"(b) Ray Train, 1 worker x {threads} threads, batch {batch_size}")
        one = train(
            replace(
                base,
                run_id="bench-1",
                num_workers=1,
                cpus_per_worker=1.0,
                threads_per_worker=threads,
            ),
            echo=echo,
        )
        echo(f"(c) Ray Train, 2 workers x {threads // 2} threads, batch {batch_size // 2} each")
        two = train(
            replace(
                base,
                run_id="bench-2",
                num_workers=2,
                batch_size=batch_size // 2,
                cpus_per_worker=0.5,
                threads_per_worker=max(1, threads // 2),
            ),
            echo=echo,
        )
    ray_1 = _steady(one.history)
    ray_2 = _steady(two.history)
    return {
        "model": model,
        "num_images": num_images,
        "size": size,
        "batch_size": batch_size,
        "threads": threads,
        "epochs": epochs,
        "plain": plain,
        "ray_1": ray_1,
        "ray_2": ray_2,
        "overhead": ray_1 / plain,
        "scaling": ray_2 / ray_1,
    }


def format_bench_train(result: dict[str, Any]) -> str:
    """The benchmark's figures as a few aligned lines."""
    return "\n".join(
        [
            f"model {result['model']}, {result['num_images']} images of {result['size']} px, "
            f"global batch {result['batch_size']}, {result['threads']} threads in all",
            f"(a) plain PyTorch loop           {result['plain']:8.1f} img/s",
            f"(b) Ray Train, 1 worker          {result['ray_1']:8.1f} img/s",
            f"(c) Ray Train, 2 workers (DDP)   {result['ray_2']:8.1f} img/s",
            f"b/a (Ray Train overhead)         {result['overhead']:8.2f}",
            f"c/b (DDP scaling, same threads)  {result['scaling']:8.2f}",
        ]
    )


def _steady(history: list[dict[str, Any]]) -> float:
    return float(statistics.median(row["images_per_s"] for row in history[1:]))


def _plain_loop(
    data: str, model_name: str, size: int, batch: int, epochs: int, threads: int
) -> float:
    """Images/s of a bare loop: decoded samples in memory, transform inline, one process."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        samples = samples_from_batch(
            load_batch(load_manifest(data, "train"), config=DatasetConfig(require_masks=True))
        )
        torch.manual_seed(0)
        model = build_model(model_name, 6)
        optimizer = build_optimizer(model, "sgd", lr=0.01)
        augment = train_transform(size, scale_range=(1.0, 1.0))
        model.train()
        rates = []
        for _ in range(epochs):
            order = torch.randperm(len(samples)).tolist()
            began = time.perf_counter()
            seen = 0
            for lo in range(0, len(order), batch):
                pairs = [
                    augment(samples[i].image, _mask(samples[i])) for i in order[lo : lo + batch]
                ]
                images = torch.stack([p[0] for p in pairs])
                masks = torch.stack([p[1] for p in pairs])
                train_step(model, images, masks, optimizer)
                seen += len(pairs)
            rates.append(seen / (time.perf_counter() - began))
        return float(statistics.median(rates[1:]))
    finally:
        torch.set_num_threads(previous)


def _mask(sample: Sample) -> np.ndarray:
    if sample.mask is None:  # read with require_masks=True
        raise RuntimeError(f"{sample.image_uri}: no mask")
    return sample.mask


# ----------------------------------------------------------------------------- segmentation


def bench_segment(
    *,
    num_images: int = 48,
    size: int = 320,
    model: str = "fcn8s_vgg16",
    threads: int = 2,
    scale: int = 10,
    memory_model: str = "fcn8s_resnet18",
    memory_size: int = 128,
    use_s3: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Segmentation images/s: a bare model loop vs the whole pipeline, plus memory at scale.

    (a) calls the model on already-decoded, normalized tensors in one process; (b) runs
    :func:`pipeline.infer.segment` from the bucket's bytes to committed Parquet with one
    actor of the same threads (Ray already started, so its start-up is not counted; the
    actor's model load is). Same model, images and threads, one run. Then the stages (b)
    adds are timed alone on the same images: read + decode, PNG encode of the label maps.
    Last, the pipeline runs again on ``memory_model`` over N and ``scale`` x N images and
    the peak resident memory (sampled every 0.2 s) of the driver and of an actor process
    is reported for each (streaming: they should stay flat).

    Args:
        num_images: Images of (a) and (b).
        size: Their side.
        model: Model of (a) and (b) (random weights: the cost is the same).
        threads: torch threads of the bare loop and of the actor.
        scale: Image-count factor of the memory runs.
        memory_model: Model of the memory runs (a light one: they are about memory).
        memory_size: Image side of the memory runs.
        use_s3: Read from a SeaweedFS S3 server started here on 127.0.0.1 (else local files).
        echo: Where progress lines go.
    """
    import ray

    from pipeline.cluster import ensure_ray
    from pipeline.infer import SegmentConfig, segment

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fcnpipe-bench-seg-")))
        root = str(tmp)
        if use_s3:
            from infra.local.seaweedfs import scratch_s3

            stack.enter_context(scratch_s3(tmp / "s3", "bench"))  # before Ray starts
            root = "s3://bench"
        if not ray.is_initialized():  # only a Ray this call starts is this call's to stop
            stack.callback(ray.shutdown)
        data = join(root, "data")
        write_synthetic(data, num_images=num_images, size=size, val_fraction=0.0)
        model_uri = _random_model(join(root, "model"), model)

        echo(
            f"(a) bare loop: {model} on {num_images} decoded images of {size} px, {threads} threads"
        )
        bare, stages = _bare_segment_loop(data, model_uri, threads)

        ensure_ray(num_cpus=threads + 1)
        echo("(b) full pipeline: bucket bytes -> committed Parquet, 1 actor")
        began = time.perf_counter()
        result = segment(
            SegmentConfig(
                input_uri=data,
                model_uri=model_uri,
                output_uri=join(root, "out"),
                run_id="bench",
                batch_size=1,
                threads_per_actor=threads,
            ),
            echo=echo,
        )
        full = result.num_images / (time.perf_counter() - began)
        steady = result.steady_images_per_s or full

        memory = []
        memory_uri = _random_model(join(root, "memory-model"), memory_model)
        for count in (num_images, num_images * scale):
            mem_data = join(root, f"mem-{count}")
            write_synthetic(mem_data, num_images=count, size=memory_size, val_fraction=0.0)
            echo(f"memory run: {count} images of {memory_size} px, {memory_model}")
            with _PeakRss("MapWorker") as actors, _PeakRss(None) as driver:
                segment(
                    SegmentConfig(
                        input_uri=mem_data,
                        model_uri=memory_uri,
                        output_uri=join(root, "out"),
                        run_id=f"mem-{count}",
                        threads_per_actor=threads,
                    ),
                    echo=echo,
                )
            memory.append(
                {"images": count, "driver_mb": driver.peak_mb, "actors_mb": actors.peak_mb}
            )
    return {
        "model": model,
        "num_images": num_images,
        "size": size,
        "threads": threads,
        "source": "s3" if use_s3 else "local",
        "bare": bare,
        "full": full,
        "ratio": full / bare,
        "steady": steady,
        "steady_ratio": steady / bare,
        "stages_ms": stages,
        "memory": memory,
    }


def format_bench_segment(result: dict[str, Any]) -> str:
    """The segmentation benchmark's figures as a few aligned lines."""
    stages = result["stages_ms"]
    lines = [
        f"model {result['model']}, {result['num_images']} images of {result['size']} px, "
        f"{result['threads']} threads, read from {result['source']}",
        f"(a) bare model loop on decoded tensors  {result['bare']:8.2f} img/s",
        f"(b) full pipeline, bytes -> Parquet     {result['full']:8.2f} img/s",
        f"b/a                                     {result['ratio']:8.2f}",
        f"(b) once the actor is up (first to last row) {result['steady']:8.2f} img/s, "
        f"b/a {result['steady_ratio']:.2f}",
        "per image, timed alone: "
        + ", ".join(f"{name} {value:.1f} ms" for name, value in stages.items()),
    ]
    for row in result["memory"]:
        lines.append(
            f"memory, {row['images']:5d} images: driver peak {row['driver_mb']:.0f} MB, "
            f"actor peak {row['actors_mb']:.0f} MB"
        )
    return "\n".join(lines)


def _random_model(uri: str, name: str) -> str:
    """A model artifact with random score layers (its label maps vary like a trained one's)."""
    from fcn.synthetic import CLASS_NAMES
    from pipeline.artifacts import ModelCard, save_model

    head, _, backbone = name.partition("_")
    torch.manual_seed(0)
    net = build_model(name, len(CLASS_NAMES))
    with torch.no_grad():
        for conv in (net.head.score_fr, *net.head.skip_scores):
            conv.weight.normal_(std=0.01)
    card = ModelCard(
        run_id="bench",
        architecture=head,
        backbone=backbone,
        num_classes=len(CLASS_NAMES),
        class_names=list(CLASS_NAMES),
        model_options={"dropout": 0.5} if backbone == "vgg16" else {},
        normalization={"name": "imagenet"},
    )
    save_model(net, card, uri)
    return uri


def _bare_segment_loop(data: str, model_uri: str, threads: int) -> tuple[float, dict[str, float]]:
    """Images/s of the model alone, and the per-image cost of the stages around it."""
    from fcn.palette import encode_label_png
    from fcn.transforms import eval_transform
    from pipeline.artifacts import load_artifact

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        manifest = load_manifest(data)
        began = time.perf_counter()
        samples = samples_from_batch(load_batch(manifest, config=DatasetConfig()))
        decode_ms = (time.perf_counter() - began) * 1000 / len(samples)
        model, card = load_artifact(model_uri)
        to_input = eval_transform(normalization=card.normalization_name)
        inputs = [to_input(s.image, None)[0][None] for s in samples]
        labels = []
        with torch.inference_mode():
            model(inputs[0])  # warm-up
            began = time.perf_counter()
            for x in inputs:
                labels.append(model(x).argmax(1)[0].numpy())
            seconds = time.perf_counter() - began
        began = time.perf_counter()
        for label in labels:
            encode_label_png(label)
        png_ms = (time.perf_counter() - began) * 1000 / len(labels)
        stages = {"model": seconds * 1000 / len(inputs), "read+decode": decode_ms, "png": png_ms}
        return len(inputs) / seconds, stages
    finally:
        torch.set_num_threads(previous)


class _PeakRss:
    """The largest resident memory (VmRSS, sampled) of any process whose command line holds
    ``marker``, or of this process when ``marker`` is None (Linux ``/proc``)."""

    def __init__(self, marker: str | None, interval_s: float = 0.2) -> None:
        self.marker = None if marker is None else marker.encode()
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.marker is None:
                procs = [Path("/proc/self")]
            else:
                procs = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
            for proc in procs:
                try:
                    if (
                        self.marker is not None
                        and self.marker not in (proc / "cmdline").read_bytes()
                    ):
                        continue
                    for line in (proc / "status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            self.peak_mb = max(self.peak_mb, int(line.split()[1]) / 1024)
                except OSError:
                    continue
