"""Committed result tables built in a second: a tiny dataset, a train run and a segment run.

The segment run's predictions are the ground truth for some images and wrong to a known
degree for others, so the best and worst images are known; its metrics are computed here with
``fcn.metrics`` (not with the code under test). An uncommitted run sits beside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from fcn.metrics import confusion_matrix, per_class_counts, scores
from fcn.palette import encode_label_png
from fcn.synthetic import CLASS_NAMES, NUM_CLASSES, make_dataset
from pipeline.data.synthetic import write_synthetic
from pipeline.storage import StorageOptions, join, resolve
from pipeline.store.runs import RunWriter

SEED = 3

T0 = datetime(2026, 11, 21, 6, 30, tzinfo=UTC)
TRAIN_RUN = "train-20261121-063000-aaaaaa"
SEGMENT_RUN = "segment-20261121-064000-bbbbbb"
UNCOMMITTED_RUN = "segment-20261121-065000-cccccc"
BROKEN_ID = "broken_000"
TRAIN_LOSS = (1.2, 0.7, 0.45)
VAL_MEAN_IOU = (0.31, 0.55, 0.72)


@dataclass(frozen=True)
class BuiltResults:
    """What :func:`build_results` wrote, and the figures the tests expect."""

    out: str
    """The output root."""
    dataset: str
    """The dataset root (VOC layout, masks for every image)."""
    model_uri: str
    """The train run's model URI."""
    image_ids: tuple[str, ...]
    """Every segmented image, in id order."""
    exact: tuple[str, ...]
    """Images predicted exactly (per-image mean IoU 1)."""
    half: str
    """The image whose top half is predicted wrong."""
    wrong: str
    """The image predicted wrong everywhere (per-image mean IoU 0)."""
    image_mean_iou: dict[str, float]
    """Per-image mean IoU (nanmean over classes in gt or prediction)."""
    class_iou: list[float | None]
    """The segment run's IoU per class (None for absent classes)."""
    run_scores: dict[str, Any]
    """The segment run's paper metrics."""


def _wrong(mask: np.ndarray) -> np.ndarray:
    """Every labelled pixel one class off; ignore pixels become background."""
    labelled = mask != 255
    return np.where(labelled, (mask.astype(np.int64) + 1) % NUM_CLASSES, 0).astype(np.uint8)


def build_results(
    root: str, *, num_images: int = 6, size: int = 64, options: StorageOptions | None = None
) -> BuiltResults:
    """Write a dataset under ``ROOT/data`` and committed runs under ``ROOT/out``.

    Args:
        root: A local directory or an ``s3://`` prefix.
        num_images: Images in the dataset (at least 4).
        size: Their side in pixels.
        options: Storage options.
    """
    dataset = join(root, "data")
    out = join(root, "out")
    write_synthetic(dataset, num_images=num_images, size=size, seed=SEED, options=options)
    # The masks as written (PNG is lossless), made again here rather than read back.
    samples = list(make_dataset(num_images, size=size, seed=SEED))
    model = join(out, "models", TRAIN_RUN)

    train = RunWriter(out, TRAIN_RUN, "train", options=options)
    train.write(
        "training",
        [
            {
                "epoch": epoch,
                "train_loss": loss,
                "val_pixel_acc": 0.5 + iou / 2,
                "val_mean_iou": iou,
                "lr": 0.01 * (1 - epoch / 3),
                "images_per_s": 20.0,
                "checkpoint_uri": join(out, "checkpoints", TRAIN_RUN, f"epoch_{epoch}"),
            }
            for epoch, (loss, iou) in enumerate(zip(TRAIN_LOSS, VAL_MEAN_IOU, strict=True))
        ],
    )
    train.write(
        "runs",
        [
            {
                "kind": "train",
                "input_uri": dataset,
                "model_uri": model,
                "num_images": num_images,
                "num_errors": 0,
                "pixel_acc": 0.86,
                "mean_acc": 0.8,
                "mean_iou": VAL_MEAN_IOU[-1],
                "fw_iou": 0.77,
                "class_names": list(CLASS_NAMES),
                "class_iou": [0.9, 0.8, 0.7, 0.6, 0.5, None],
                "started_at": T0,
                "finished_at": T0 + timedelta(minutes=5),
                "images_per_s": 20.0,
            }
        ],
    )
    train.commit({"model_uri": model}, finished_at=T0 + timedelta(minutes=5))

    ids = sorted(sample.image_id for sample in samples)
    half, wrong = ids[-2], ids[-1]
    segment = RunWriter(out, SEGMENT_RUN, "segment", options=options)
    total = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    image_mean_iou: dict[str, float] = {}
    for sample in samples:
        image_id, mask = sample.image_id, sample.mask
        height, width = mask.shape
        pred = np.where(mask == 255, 0, mask).astype(np.uint8)
        if image_id == half:
            pred[: height // 2] = _wrong(mask)[: height // 2]
        elif image_id == wrong:
            pred = _wrong(mask)
        confusion = confusion_matrix(pred, mask, NUM_CLASSES)
        total += confusion
        counts = per_class_counts(confusion)
        image_mean_iou[image_id] = float(scores(confusion)["mean_iou"])
        segment.write(
            "predictions",
            [
                {
                    "image_id": image_id,
                    "image_uri": join(dataset, "JPEGImages", f"{image_id}.jpg"),
                    "height": height,
                    "width": width,
                    "label_map": encode_label_png(pred),
                    "class_pixel_counts": np.bincount(pred.ravel(), minlength=NUM_CLASSES).tolist(),
                    "model_uri": model,
                    "latency_ms": 3.0,
                }
            ],
        )
        segment.write(
            "class_metrics",
            [
                {
                    "image_id": image_id,
                    "class_id": c,
                    "class_name": CLASS_NAMES[c],
                    "gt_pixels": int(counts["gt_pixels"][c]),
                    "pred_pixels": int(counts["pred_pixels"][c]),
                    "intersection": int(counts["intersection"][c]),
                    "union": int(counts["union"][c]),
                    "iou": float(counts["intersection"][c] / counts["union"][c]),
                }
                for c in range(NUM_CLASSES)
                if counts["union"][c] > 0
            ],
        )
    segment.write(
        "errors",
        [
            {
                "image_id": BROKEN_ID,
                "image_uri": join(dataset, "JPEGImages", f"{BROKEN_ID}.jpg"),
                "stage": "decode_image",
                "error_type": "Truncated",
                "message": "image file is truncated",
            }
        ],
    )
    run_scores = scores(total)
    class_iou = [None if np.isnan(v) else float(v) for v in run_scores["iou"]]
    # The model as a user may type it: an equivalent URI, not the same string.
    typed_model = f"file://{model}/" if resolve(model).is_local else f"{model}/"
    segment.write(
        "runs",
        [
            {
                "kind": "segment",
                "input_uri": dataset,
                "model_uri": typed_model,
                "num_images": len(samples),
                "num_errors": 1,
                "pixel_acc": run_scores["pixel_acc"],
                "mean_acc": run_scores["mean_acc"],
                "mean_iou": run_scores["mean_iou"],
                "fw_iou": run_scores["fw_iou"],
                "class_names": list(CLASS_NAMES),
                "class_iou": class_iou,
                "started_at": T0 + timedelta(minutes=10),
                "finished_at": T0 + timedelta(minutes=11),
                "images_per_s": 30.0,
            }
        ],
    )
    segment.commit({"model_uri": typed_model}, finished_at=T0 + timedelta(minutes=11))

    # A crashed (never committed) run: its files exist, readers must not see them.
    crashed = RunWriter(out, UNCOMMITTED_RUN, "segment", options=options)
    crashed.write(
        "predictions",
        [
            {
                "image_id": ids[0],
                "image_uri": join(dataset, "JPEGImages", f"{ids[0]}.jpg"),
                "height": size,
                "width": size,
                "label_map": encode_label_png(np.zeros((size, size), np.uint8)),
                "class_pixel_counts": [size * size] + [0] * (NUM_CLASSES - 1),
                "model_uri": model,
            }
        ],
    )
    crashed.write(
        "runs",
        [
            {
                "kind": "segment",
                "input_uri": dataset,
                "model_uri": model,
                "num_images": 1,
                "num_errors": 0,
                "started_at": T0 + timedelta(minutes=20),
                "finished_at": T0 + timedelta(minutes=21),
            }
        ],
    )
    crashed.flush()

    return BuiltResults(
        out=out,
        dataset=dataset,
        model_uri=model,
        image_ids=tuple(ids),
        exact=tuple(i for i in ids if i not in (half, wrong)),
        half=half,
        wrong=wrong,
        image_mean_iou=image_mean_iou,
        class_iou=class_iou,
        run_scores={k: v for k, v in run_scores.items() if k != "iou"},
    )
