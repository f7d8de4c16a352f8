"""Rows of the result tables for the tests of ``pipeline.tables`` (unit and integration)."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from PIL import Image

T0 = datetime(2026, 11, 21, 6, 30, tzinfo=UTC)


def png(height: int = 4, width: int = 5) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ones((height, width), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


LABEL_MAP = png()


def predictions(ids: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "image_id": i,
            "image_uri": f"s3://in/images/{i}.jpg",
            "height": 4,
            "width": 5,
            "label_map": LABEL_MAP,
            "class_pixel_counts": [0, 20],
            "model_uri": "s3://out/models/train-1",
            "latency_ms": 2.5,
        }
        for i in ids
    ]


def runs_row(kind: str, mean_iou: float) -> dict[str, Any]:
    return {
        "kind": kind,
        "input_uri": "s3://in/images",
        "model_uri": "s3://out/models/train-1",
        "num_images": 3,
        "num_errors": 0,
        "pixel_acc": 0.9,
        "mean_acc": 0.8,
        "mean_iou": mean_iou,
        "fw_iou": 0.85,
        "class_names": ["background", "shape"],
        "class_iou": [0.9, float("nan")],
        "started_at": T0,
        "finished_at": T0 + timedelta(minutes=1),
        "images_per_s": 10.0,
    }


def metrics(image_id: str) -> list[dict[str, Any]]:
    return [
        {
            "image_id": image_id,
            "class_id": 0,
            "class_name": "background",
            "gt_pixels": 10,
            "pred_pixels": 12,
            "intersection": 9,
            "union": 13,
            "iou": 9 / 13,
        },
        {
            "image_id": image_id,
            "class_id": 1,
            "class_name": "shape",
            "gt_pixels": 10,
            "pred_pixels": 8,
            "intersection": 7,
            "union": 11,
            "iou": 7 / 11,
        },
    ]
