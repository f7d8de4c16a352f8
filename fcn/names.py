"""The names the builders accept, without importing torch: for configurations and CLIs.

``fcn.models``, ``fcn.optim`` and ``fcn.transforms`` build from these; a configuration that
only needs to check a name (and a CLI that lists the choices in ``--help``) imports this
module alone.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "BACKBONES",
    "HEADS",
    "NORMALIZATIONS",
    "OPTIMIZERS",
    "SCHEDULES",
    "Backbone",
    "Head",
    "Normalization",
    "OptimizerName",
    "Schedule",
]

Head = Literal["fcn32s", "fcn16s", "fcn8s"]
"""FCN heads, coarse to fine: skips from pool4 (16s) and pool3 (8s)."""
HEADS: tuple[str, ...] = get_args(Head)

Backbone = Literal["vgg16", "resnet18", "resnet50", "mobilenet_v3_large"]
"""Backbones: the paper's VGG16, and lighter ones with output strides 8/16/32."""
BACKBONES: tuple[str, ...] = get_args(Backbone)

OptimizerName = Literal["sgd", "adamw"]
"""``sgd`` with momentum (the paper's) or ``adamw``."""
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)

Schedule = Literal["poly", "cosine", "constant"]
"""Learning-rate decay over a run."""
SCHEDULES: tuple[str, ...] = get_args(Schedule)

Normalization = Literal["imagenet", "caffe_bgr"]
"""Names of the supported input normalizations."""
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)
