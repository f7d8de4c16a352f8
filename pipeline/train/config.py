"""The training job's configuration: what to train on what, how, where, on how many workers.

``TrainConfig`` holds the job's identity (dataset, output root, run id) and four sections:
``model`` (which FCN, from what), ``data`` (splits, crops, augmentation, reading),
``optim`` (epochs, batches, optimizer, schedule, loss), ``scaling`` (workers, devices,
placement, failures) and ``compute`` (precision, memory layout, compilation:
:mod:`pipeline.compute`). See :mod:`pipeline.config` for how the CLI, the flows and Ray Jobs share
it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

from fcn.names import (
    BACKBONES,
    HEADS,
    NORMALIZATIONS,
    OPTIMIZERS,
    SCHEDULES,
    Backbone,
    Head,
    Normalization,
    OptimizerName,
    Schedule,
)
from pipeline.compute import ComputeConfig
from pipeline.config import FORBID, check_choice
from pipeline.data.reading import SHUFFLE_MODES, DatasetConfig, ShuffleMode
from pipeline.errors import ConfigError
from pipeline.plan import AUTO, Auto
from pipeline.tables import validate_run_id

__all__ = [
    "ClassWeighting",
    "ModelSection",
    "OptimSection",
    "PlacementStrategy",
    "TrainConfig",
    "TrainConfigError",
    "TrainDataSection",
    "TrainScaling",
]

ClassWeighting = Literal["none", "median_frequency"]
PlacementStrategy = Literal["auto", "PACK", "SPREAD"]


class TrainConfigError(ConfigError):
    """A training configuration that cannot work with its dataset (the message says why)."""


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    """Which FCN, and what it starts from."""

    __pydantic_config__: ClassVar[dict[str, str]] = FORBID

    head: Head = field(default="fcn8s", metadata={"cli": "model"})
    """FCN head: ``fcn32s``, ``fcn16s`` or ``fcn8s``."""
    backbone: Backbone = "resnet18"
    """Backbone (see ``fcnpipe models``)."""
    num_classes: int | None = None
    """Number of classes; None: the dataset's (from ``classes.txt`` or the VOC names)."""
    dropout: float = 0.5
    """Dropout after fc6 and fc7 (VGG16 only)."""
    normalization: Normalization = "imagenet"
    """Input normalization (``caffe_bgr`` for the paper's Caffe VGG16 weights)."""
    init_from: str | None = None
    """Model artifact to start from (staged training: FCN-16s from FCN-32s, FCN-8s from
    FCN-16s); every layer the two share is copied."""
    backbone_weights: str | None = None
    """Path or URI of a torchvision-format backbone state dict (nothing is downloaded)."""

    def __post_init__(self) -> None:
        check_choice("model", self.head, HEADS)
        check_choice("backbone", self.backbone, BACKBONES)
        check_choice("normalization", self.normalization, NORMALIZATIONS)
        if self.num_classes is not None and not 1 <= self.num_classes <= 255:
            raise ConfigError(f"num_classes must be in [1, 255], got {self.num_classes}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def name(self) -> str:
        """``fcn.models.build_model`` name, e.g. ``fcn8s_resnet18``."""
        return f"{self.head}_{self.backbone}"

    @property
    def options(self) -> dict[str, Any]:
        """Keyword arguments of ``fcn.models.build_model`` besides name and classes."""
        options: dict[str, Any] = {"backbone": self.backbone}
        if self.backbone == "vgg16":
            options["dropout"] = self.dropout
        return options


@dataclass(frozen=True, kw_only=True)
class TrainDataSection:
    """Which splits, how the training crops are made, how the data is read and shuffled."""

    __pydantic_config__: ClassVar[dict[str, str]] = FORBID

    train_split: str = "train"
    """Split trained on."""
    val_split: str | None = "val"
    """Split validated on each epoch at full image size; None (``''`` on the CLI): none."""
    crop_size: int = 256
    """Side of the square training crops (images smaller than a crop are padded, the mask
    with the ignore label)."""
    pad_crops: bool = True
    """Allow crops larger than the (scaled) images; False rejects such a config up front."""
    scale_range: tuple[float, float] = (0.5, 2.0)
    """Random rescale range (LOW HIGH) before cropping; 1 1 disables it."""
    hflip: bool = True
    """Random horizontal flips."""
    shuffle: ShuffleMode = "rows"
    """Per-epoch shuffle of the train split: ``rows`` (a global shuffle, an all-to-all pass
    over the split each epoch), ``blocks`` (block order, plus a worker-local buffer of a few
    batches: much cheaper, a little less random) or ``none``."""
    read: DatasetConfig = field(default_factory=DatasetConfig)
    """Reading and decoding options (limits, layout, storage); masks are always required."""

    def __post_init__(self) -> None:
        if self.val_split is not None and self.val_split == self.train_split:
            raise ConfigError(f"train and val split are both {self.train_split!r}")
        if self.crop_size < 1:
            raise ConfigError(f"crop_size must be >= 1, got {self.crop_size}")
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ConfigError(f"scale_range must be (low, high) with 0 < low <= high: {low, high}")
        check_choice("shuffle", self.shuffle, SHUFFLE_MODES)


@dataclass(frozen=True, kw_only=True)
class OptimSection:
    """How the weights are fitted: epochs, batches, optimizer, schedule, loss."""

    __pydantic_config__: ClassVar[dict[str, str]] = FORBID

    epochs: int = 8
    """Passes over the train split."""
    batch_size: int = 8
    """Crops per worker per step (the global batch is ``num_workers`` times this)."""
    grad_accum: int = 1
    """Batches whose gradients are summed before each optimizer step."""
    optimizer: OptimizerName = "sgd"
    """``sgd`` (with momentum, as in the paper) or ``adamw``."""
    lr: float = 0.01
    """Base learning rate."""
    momentum: float = 0.9
    """SGD momentum (AdamW's beta1)."""
    weight_decay: float = 5e-4
    """Weight decay of weights; none on biases and norm parameters."""
    schedule: Schedule = "poly"
    """Learning-rate decay over the run: ``poly`` (power 0.9), ``cosine`` or ``constant``."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup."""
    class_weighting: ClassWeighting = "none"
    """``median_frequency``: weight each class's loss by median frequency / its frequency in
    the train masks (Eigen & Fergus); ``none``: the paper's unweighted loss."""
    seed: int = 0
    """Seed of the weights' initialisation and of each rank's augmentation."""

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("class_weighting", self.class_weighting, get_args(ClassWeighting))
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ConfigError("momentum must be in [0, 1) and weight_decay >= 0")


@dataclass(frozen=True, kw_only=True)
class TrainScaling:
    """How many workers, on what, where, and how many restarts."""

    __pydantic_config__: ClassVar[dict[str, str]] = FORBID

    num_workers: int | Auto = AUTO
    """Ray Train workers (DDP ranks); auto: one per GPU on GPUs, else one per node (each with
    all of its node's CPUs as threads: faster than several ranks of fewer threads)."""
    use_gpu: bool | None = None
    """One GPU per worker (nccl); else CPU (gloo); unset: GPUs when the cluster has them."""
    cpus_per_worker: float | Auto = AUTO
    """CPUs Ray reserves per worker; auto: one per node its node's CPUs but one, else 1, or
    less on a small cluster, so that one CPU stays free for Ray Data (which feeds the
    workers: with none free, training waits)."""
    threads_per_worker: int | Auto = AUTO
    """torch threads per worker; auto: one per node its node's CPUs, else its CPUs rounded up."""
    placement_strategy: PlacementStrategy = "auto"
    """Where Ray places the workers: ``PACK`` fills nodes one after another (DDP traffic
    stays inside a node), ``SPREAD`` puts them on as many nodes as it can (each node's
    memory, disk and network serve fewer workers); auto: SPREAD for one rank per node, else
    PACK. Either way a lost worker restarts the whole group from the latest checkpoint."""
    max_failures: int = 2
    """Worker-group restarts from the latest checkpoint before the run fails."""

    def __post_init__(self) -> None:
        check_choice("placement_strategy", self.placement_strategy, get_args(PlacementStrategy))
        for name in ("num_workers", "threads_per_worker"):
            value = getattr(self, name)
            if value != AUTO and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.max_failures < 0:
            raise ConfigError(f"max_failures must be >= 0, got {self.max_failures}")
        if self.cpus_per_worker != AUTO and self.cpus_per_worker <= 0:
            raise ConfigError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training job: what to train on what, how, where, and on how many workers."""

    __pydantic_config__: ClassVar[dict[str, str]] = FORBID

    dataset_uri: str
    """Dataset root (VOC or images/ + masks/ layout) or manifest, with masks."""
    output_uri: str
    """Output root: the artifact, the checkpoints and the tables go under it."""
    run_id: str | None = None
    """Run id (letters, digits, ``._-``, starting with a letter); None: a new one. The same
    id resumes a crashed run."""
    overwrite: bool = False
    """Replace a committed run with the same id (its checkpoints and artifact too)."""
    model: ModelSection = field(default_factory=ModelSection)
    """Which FCN, and what it starts from."""
    data: TrainDataSection = field(default_factory=TrainDataSection)
    """Splits, crops, augmentation, reading."""
    optim: OptimSection = field(default_factory=OptimSection)
    """Epochs, batches, optimizer, schedule, loss."""
    scaling: TrainScaling = field(default_factory=TrainScaling)
    """Workers, devices, placement, restarts."""
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    """Precision, memory layout, compilation (chosen on the workers for ``auto``)."""

    def __post_init__(self) -> None:
        if self.run_id is not None:
            validate_run_id(self.run_id)
