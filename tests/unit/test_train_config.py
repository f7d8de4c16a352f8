"""The training job's configuration and the driver's pure steps, without Ray.

- ``TrainConfig`` rejects every contradictory or out-of-range value with a one-line
  ``ConfigError`` naming the field, whether built in Python or read from JSON;
- class weighting (``--class-weighting median_frequency``) counts the train masks' labelled
  pixels and weighs classes by median frequency;
- gradient accumulation groups are cut right, the last one short.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import build, dump, evolve, from_json, make, to_json
from pipeline.errors import ConfigError
from pipeline.train.config import TrainConfig
from pipeline.train.driver import _class_weights
from pipeline.train.worker import _group_size

pytestmark = pytest.mark.unit

BASE = {"dataset_uri": "s3://b/data", "output_uri": "s3://b/out"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"grad_accum": 0}, "grad_accum must be >= 1"),
        ({"lr": 0.0}, "lr must be a positive number"),
        ({"lr": float("inf")}, "lr must be a positive number"),
        ({"momentum": 1.0}, "momentum must be in [0, 1)"),
        ({"weight_decay": -1e-4}, "weight_decay >= 0"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
        ({"scale_range": (2.0, 1.0)}, "scale_range must be (low, high)"),
        ({"scale_range": (0.0, 1.0)}, "scale_range must be (low, high)"),
        ({"crop_size": 0}, "crop_size must be >= 1"),
        ({"val_split": "train"}, "train and val split are both 'train'"),
        ({"num_classes": 256}, "num_classes must be in [1, 255]"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"num_workers": 0}, "num_workers must be >= 1"),
        ({"max_failures": -1}, "max_failures must be >= 0"),
        ({"cpus_per_worker": 0.0}, "cpus_per_worker must be > 0"),
        ({"threads_per_worker": 0}, "threads_per_worker must be >= 1"),
        ({"precision": "fp8"}, "precision"),
        ({"memory_format": "nhwc"}, "memory_format"),
        ({"head": "fcn4s"}, "fcn32s"),
        ({"backbone": "vgg19"}, "vgg16"),
        ({"optimizer": "adam"}, "sgd"),
        ({"schedule": "step"}, "poly"),
        ({"shuffle": "all"}, "rows"),
        ({"placement_strategy": "STRICT_PACK"}, "PACK"),
        ({"class_weighting": "inverse"}, "median_frequency"),
        ({"run_id": "9lives"}, "invalid run id"),
        ({"layout": "coco"}, "layout"),
        ({"s3_endpoint": "ftp://x"}, "s3_endpoint"),
    ],
)
def test_invalid_values_are_one_line_config_errors(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        make(TrainConfig, **BASE, **fields)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_unknown_fields_are_refused_not_dropped() -> None:
    with pytest.raises(ConfigError, match="no field 'epoch'"):
        make(TrainConfig, **BASE, epoch=3)
    data = dump(make(TrainConfig, **BASE))
    data["optim"]["epoch"] = 3
    with pytest.raises(ConfigError, match=r"optim\.epoch"):
        build(TrainConfig, data)


def test_json_round_trip_and_nested_names() -> None:
    config = make(TrainConfig, **BASE, head="fcn16s", epochs=3, layout="voc", scale_range=(1, 1))
    assert config.model.head == "fcn16s" and config.optim.epochs == 3
    assert config.data.read.layout == "voc" and config.data.scale_range == (1.0, 1.0)
    assert from_json(TrainConfig, to_json(config)) == config
    assert evolve(config, model__head="fcn8s", num_workers=1).model.head == "fcn8s"
    assert make(TrainConfig, **BASE, model="fcn32s").model.head == "fcn32s"  # the CLI name


class _Decoded:
    """Stands in for the decoded train split (only ``iter_batches`` of its ``mask`` column)."""

    def __init__(self, masks: list[np.ndarray]) -> None:
        self.masks = masks

    def iter_batches(self, **_: Any) -> Any:
        yield pa.table({"mask": [m.tobytes() for m in self.masks]})


def test_class_weighting_counts_labelled_pixels_of_the_train_masks() -> None:
    masks = [
        np.array([[0, 0, 0, 1]], np.uint8),
        np.array([[0, 0, 255, 1]], np.uint8),  # 255: ignored, not a class
        np.array([[0, 2, 2, 2]], np.uint8),
    ]
    # Pixels: class 0: 6, class 1: 2, class 2: 3, class 3: 0 (of 11 labelled).
    weights = _class_weights(_Decoded(masks), num_classes=4)
    median = 3 / 11
    assert weights == pytest.approx((median / (6 / 11), median / (2 / 11), 1.0, 1.0))


@pytest.mark.parametrize(
    ("accum", "batches", "groups"),
    [(1, 3, [1, 1, 1]), (2, 5, [2, 2, 2, 2, 1]), (4, 3, [3, 3, 3]), (3, 6, [3] * 6)],
)
def test_accumulation_groups(accum: int, batches: int, groups: list[int]) -> None:
    assert [_group_size(i, accum, batches) for i in range(batches)] == groups
