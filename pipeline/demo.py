"""The one-command demo on embedded defaults: synthetic data in, FCN metrics out.

Usage:
    fcnpipe demo [--workdir fcnpipe-demo] [--epochs 8]

It makes the synthetic shapes dataset in a local "bucket" directory (VOC
layout), trains an FCN-8s (ResNet-18 backbone, from scratch: nothing is
downloaded) in this process on its train split, scores the val split at full
image size with one confusion matrix as the paper does, and writes colour
overlays of a few val images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console

from fcn import synthetic
from fcn.engine import evaluate, predict, train_step
from fcn.models import build_model
from fcn.palette import colorize, overlay
from fcn.transforms import eval_transform, train_transform
from pipeline.datasets import (
    DatasetConfig,
    Sample,
    build_manifest,
    load_batch,
    samples_from_batch,
    write_synthetic,
)
from pipeline.summary import print_class_iou, print_paper_table

__all__ = ["DemoConfig", "DemoResult", "run_demo"]


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """What the demo makes and how long it trains."""

    workdir: Path = Path("fcnpipe-demo")
    """Directory for the local bucket and the overlays."""
    num_images: int = 160
    """Synthetic images (train and val together)."""
    size: int = 128
    """Image side in pixels."""
    epochs: int = 16
    """Passes over the train split."""
    batch_size: int = 8
    """Crops per optimisation step."""
    model: str = "fcn8s_resnet18"
    """Model name for ``fcn.models.build_model``."""
    lr: float = 2e-3
    """AdamW learning rate."""
    seed: int = 0
    """Seed for data, weights and order."""
    val_fraction: float = 0.25
    """Share of images in the val split."""

    def __post_init__(self) -> None:
        if self.num_images < 4:
            raise ValueError(f"num_images must be >= 4, got {self.num_images}")
        if self.size < 32:
            raise ValueError(f"size must be >= 32 pixels, got {self.size}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured."""

    scores: dict[str, object]
    """The paper's metrics on the val split (``fcn.metrics.scores``)."""
    class_names: tuple[str, ...]
    """Class names, index = class id."""
    dataset_uri: str
    """Where the synthetic dataset was written."""
    overlay_paths: tuple[Path, ...]
    """Image | ground truth | prediction PNGs of a few val images."""
    train_seconds: float
    """Wall time of the training loop."""


def run_demo(config: DemoConfig, console: Console | None = None) -> DemoResult:
    """Make data, train, evaluate, write overlays and print the paper-style table.

    Args:
        config: what to make and how long to train.
        console: where progress goes (stdout when None).
    """
    console = console or Console()
    torch.manual_seed(config.seed)
    dataset_uri = str((config.workdir / "bucket" / "shapes").resolve())
    write_synthetic(
        dataset_uri,
        num_images=config.num_images,
        size=config.size,
        seed=config.seed,
        val_fraction=config.val_fraction,
    )
    # Read back what was written, through the manifest and the bounded decoder.
    manifest = build_manifest(dataset_uri)
    class_names = synthetic.CLASS_NAMES
    num_classes = len(class_names)
    decoded = load_batch(
        manifest, config=DatasetConfig(require_masks=True), num_classes=num_classes
    )
    samples = samples_from_batch(decoded)
    if len(samples) != manifest.num_rows:
        raise RuntimeError(f"{manifest.num_rows - len(samples)} demo images failed to decode")
    train = [s for s in samples if s.split == "train"]
    val = [s for s in samples if s.split == "val"]
    console.print(
        f"dataset: {len(samples)} images ({config.size} px; {len(train)} train, {len(val)} val)"
        f" in VOC layout at {dataset_uri}"
    )
    model = build_model(config.model, num_classes)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=1e-4
    )
    augment = train_transform(config.size, scale_range=(0.75, 1.25))
    started = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(train)).tolist()
        losses = []
        for lo in range(0, len(order), config.batch_size):
            pairs = [
                augment(train[i].image, _mask(train[i])) for i in order[lo : lo + config.batch_size]
            ]
            if len(pairs) < 2:  # BatchNorm needs more than one crop
                continue
            images = torch.stack([p[0] for p in pairs])
            masks = torch.stack([p[1] for p in pairs])
            losses.append(train_step(model, images, masks, optimizer))
        console.print(f"epoch {epoch + 1}/{config.epochs}: train loss {np.mean(losses):.4f}")
    train_seconds = time.perf_counter() - started

    to_input = eval_transform()
    val_inputs = [to_input(s.image, _mask(s)) for s in val]
    confusion = evaluate(model, val_inputs, num_classes)
    scores = confusion.scores()
    print_paper_table(
        console, {config.model: scores}, title="val split (paper metrics, one confusion matrix)"
    )
    print_class_iou(console, list(np.asarray(scores["iou"])), class_names)

    overlay_dir = config.workdir / "overlays"
    overlay_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for sample, (image, _) in list(zip(val, val_inputs, strict=True))[:4]:
        pred = predict(model, image).numpy()
        panel = np.concatenate(
            [sample.image, colorize(_mask(sample)), overlay(sample.image, pred)], axis=1
        )
        path = overlay_dir / f"{sample.image_id}.png"
        Image.fromarray(panel).save(path)
        paths.append(path)
    console.print(
        f"trained in {train_seconds:.0f} s; overlays (image | truth | prediction) in {overlay_dir}"
    )
    return DemoResult(scores, class_names, dataset_uri, tuple(paths), train_seconds)


def _mask(sample: Sample) -> np.ndarray:
    if sample.mask is None:  # read with require_masks=True, so this is a bug
        raise RuntimeError(f"{sample.image_uri}: no mask")
    return sample.mask
