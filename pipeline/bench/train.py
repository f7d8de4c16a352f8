"""``fcnpipe bench train``: training images/s, a plain loop vs Ray Train vs DDP, in one run.

Usage:
    fcnpipe bench train [--num-images 64 --size 96 --epochs 3]

``bench_train`` measures training images/s of (a) a plain single-process PyTorch loop (in a
Ray worker, so in the same process environment as the training workers),
(b) Ray Train with one worker, (c) Ray Train with two workers on half the threads each:
same model, data, global batch and total threads, in one run, so the ratios (Ray's
overhead b/a, DDP scaling c/b) compare like with like.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcn.engine import train_step
from fcn.models import build_model
from fcn.optim import build_optimizer
from fcn.transforms import train_transform
from pipeline.compute import ComputeConfig, ComputePlan, Precision, resolve, training_probe
from pipeline.config import evolve, make
from pipeline.data.batches import Sample, samples_from_batch
from pipeline.data.layouts import load_manifest
from pipeline.data.reading import DatasetConfig, load_batch
from pipeline.data.synthetic import write_synthetic
from pipeline.train.config import TrainConfig
from pipeline.train.driver import train

__all__ = ["bench_train", "format_bench_train"]


def bench_train(
    *,
    num_images: int = 64,
    size: int = 96,
    model: str = "fcn8s_resnet18",
    batch_size: int = 8,
    epochs: int = 3,
    threads: int = 2,
    precision: Precision = "auto",
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
        precision: The precision policy of all three (:mod:`pipeline.compute`; each way
            resolves ``auto`` on its own process).
        echo: Where progress lines go.

    Returns:
        ``{"plain": img/s, "ray_1": img/s, "ray_2": img/s, "overhead": ray_1 / plain,
        "scaling": ray_2 / ray_1, ...}`` plus the settings.
    """
    import ray

    from pipeline.cluster import ensure_ray

    if epochs < 2 or threads < 2 or batch_size < 2:
        raise ValueError("bench_train needs epochs >= 2, threads >= 2 and batch_size >= 2")
    head, _, backbone = model.partition("_")
    with tempfile.TemporaryDirectory(prefix="fcnpipe-bench-train-") as tmp:
        data = str(Path(tmp) / "data")
        write_synthetic(data, num_images=num_images, size=size, val_fraction=0.0)
        echo(f"(a) plain PyTorch loop, {threads} threads, batch {batch_size}")
        # Ray's CPU reservations only place the workers (torch threads are set apart); they
        # leave a CPU to Ray Data, whose tasks feed the workers.
        ensure_ray(num_cpus=threads)
        # In a Ray worker, as the training workers: the same process environment.
        plain, plain_plan = ray.get(
            ray.remote(num_cpus=1)(_plain_loop).remote(
                data, model, size, batch_size, epochs, threads, ComputeConfig(precision=precision)
            )
        )
        echo(f"    compute: {plain_plan.describe()}")
        base = make(
            TrainConfig,
            dataset_uri=data,
            output_uri=str(Path(tmp) / "out"),
            head=head,
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
            precision=precision,
        )
        echo(f"(b) Ray Train, 1 worker x {threads} threads, batch {batch_size}")
        one = train(
            evolve(
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
            evolve(
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
        "precision": precision,
        "compute": {
            "plain": plain_plan.compute.name,
            "ray_1": _compute_name(one.compute),
            "ray_2": _compute_name(two.compute),
        },
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
            f"global batch {result['batch_size']}, {result['threads']} threads in all, "
            f"precision {result['precision']}",
            "compute: " + ", ".join(f"{k} {v}" for k, v in result["compute"].items()),
            f"(a) plain PyTorch loop           {result['plain']:8.1f} img/s",
            f"(b) Ray Train, 1 worker          {result['ray_1']:8.1f} img/s",
            f"(c) Ray Train, 2 workers (DDP)   {result['ray_2']:8.1f} img/s",
            f"b/a (Ray Train overhead)         {result['overhead']:8.2f}",
            f"c/b (DDP scaling, same threads)  {result['scaling']:8.2f}",
        ]
    )


def _compute_name(record: dict[str, Any]) -> str:
    return str(record.get("precision")) + (
        " + channels_last" if record.get("channels_last") else ""
    )


def _steady(history: list[dict[str, Any]]) -> float:
    return float(statistics.median(row["images_per_s"] for row in history[1:]))


def _plain_loop(
    data: str,
    model_name: str,
    size: int,
    batch: int,
    epochs: int,
    threads: int,
    compute: ComputeConfig,
) -> tuple[float, ComputePlan]:
    """Images/s of a bare loop (decoded samples in memory, transform inline, one process) in
    the precision the policy resolves to here, and that resolution."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        samples = samples_from_batch(
            load_batch(load_manifest(data, "train"), config=DatasetConfig(), require_masks=True)
        )
        torch.manual_seed(0)
        model = build_model(model_name, 6)
        key = f"train {model_name} {batch}x{size}x{size}"
        probe = training_probe(model, (size, size), batch, 6)
        plan = resolve(compute, torch.device("cpu"), probe=probe, key=key)
        plan.compute.model(model)
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
                train_step(model, images, masks, optimizer, compute=plan.compute)
                seen += len(pairs)
            rates.append(seen / (time.perf_counter() - began))
        return float(statistics.median(rates[1:])), plan
    finally:
        torch.set_num_threads(previous)


def _mask(sample: Sample) -> np.ndarray:
    if sample.mask is None:  # read with require_masks=True
        raise RuntimeError(f"{sample.image_uri}: no mask")
    return sample.mask
