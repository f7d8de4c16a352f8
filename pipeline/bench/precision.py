"""``fcnpipe bench precision``: a trained model's label maps in another precision or engine,
against torch fp32.

Usage:
    fcnpipe bench precision MODEL_URI DATASET_URI [--split val --precision auto --backend auto]

Segments every image of the split twice with the engines the actors run
(:mod:`pipeline.segment.engines`): once with torch in fp32 NCHW, once with the engine and
precision asked (``auto`` resolves here), and prints the share of pixels whose class agrees,
both runs' paper metrics from their confusion matrices, and both times.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fcn.metrics import ConfusionMatrix
from pipeline.compute import Precision
from pipeline.data.batches import samples_from_batch
from pipeline.data.layouts import load_manifest
from pipeline.data.reading import DatasetConfig, load_batch
from pipeline.segment.config import SegmentCompute
from pipeline.segment.engines import Backend, load_engine

__all__ = ["bench_precision", "format_bench_precision"]


def bench_precision(
    model_uri: str,
    dataset_uri: str,
    *,
    split: str | None = "val",
    precision: Precision = "auto",
    backend: Backend = "auto",
    threads: int = 2,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Label maps and metrics of ``precision`` against fp32 (see the module docstring).

    Returns:
        ``{"images", "pixels", "agreement", "reference": {...}, "candidate": {...}}``, each
        side with ``compute``, ``seconds``, ``mean_iou`` and ``pixel_acc``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if backend != "torch":
            from pipeline.artifacts import load_card
            from pipeline.export import ensure_onnx

            ensure_onnx(model_uri, load_card(model_uri))
        manifest = load_manifest(dataset_uri, split)
        samples = samples_from_batch(load_batch(manifest, config=DatasetConfig()))
        echo(f"{len(samples)} images of {dataset_uri} ({split or 'all'})")
        sides: dict[str, Any] = {}
        labels: dict[str, list[np.ndarray]] = {}
        for side, config in (
            (
                "reference",
                SegmentCompute(precision="fp32", memory_format="contiguous", backend="torch"),
            ),
            ("candidate", SegmentCompute(precision=precision, backend=backend)),
        ):
            engine = load_engine(
                model_uri,
                backend=config.backend,
                compute=config,
                device=torch.device("cpu"),
                threads=threads,
            )
            confusion = ConfusionMatrix(engine.card.num_classes)
            began = time.perf_counter()
            maps = []
            for sample in samples:
                label = engine.labels(np.ascontiguousarray(sample.image.transpose(2, 0, 1)[None]))[
                    0
                ]
                maps.append(label)
                if sample.mask is not None:
                    confusion.update(label.astype(np.int64), sample.mask.astype(np.int64))
            scores = confusion.scores()
            sides[side] = {
                "compute": engine.describe(),
                "seconds": time.perf_counter() - began,
                "mean_iou": float(scores["mean_iou"]),
                "pixel_acc": float(scores["pixel_acc"]),
            }
            labels[side] = maps
            echo(f"  {side}: {sides[side]['compute']}, {sides[side]['seconds']:.1f} s")
    finally:
        torch.set_num_threads(previous)
    same = sum(
        int((a == b).sum()) for a, b in zip(labels["reference"], labels["candidate"], strict=True)
    )
    pixels = sum(a.size for a in labels["reference"])
    return {"images": len(samples), "pixels": pixels, "agreement": same / pixels, **sides}


def format_bench_precision(result: dict[str, Any]) -> str:
    """The comparison as a few lines."""
    ref, cand = result["reference"], result["candidate"]
    return "\n".join(
        [
            f"{result['images']} images, {result['pixels']} pixels",
            f"fp32 NCHW:  mean IoU {ref['mean_iou']:.4f}, pixel acc {ref['pixel_acc']:.4f}, "
            f"{ref['seconds']:.1f} s",
            f"{cand['compute']}:",
            f"            mean IoU {cand['mean_iou']:.4f}, pixel acc {cand['pixel_acc']:.4f}, "
            f"{cand['seconds']:.1f} s",
            f"pixels that agree: {result['agreement']:.4%}; mean IoU difference "
            f"{abs(cand['mean_iou'] - ref['mean_iou']):.4f}; speed-up "
            f"{ref['seconds'] / cand['seconds']:.2f}x",
        ]
    )
