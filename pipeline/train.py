"""Distributed data-parallel FCN training on Ray Train.

Usage:
    fcnpipe train DATASET_URI --output OUT_URI [--model fcn8s --backbone resnet18 \\
        --epochs 8 --num-workers 2 --run-id ID]

The driver (:func:`train`) checks the configuration against the dataset before any
worker starts, decodes the train and val splits once into Ray's object store, and runs a
Ray Train V2 ``TorchTrainer``: :func:`train_loop_per_worker` owns one rank (DDP over gloo
on CPU, nccl on GPU). Each epoch every rank trains on its shard of the train split,
evaluates its share of the val split at full image size, the confusion matrices are summed
across ranks, and a checkpoint goes to ``OUT/checkpoints/<run_id>/epoch_NNNN`` on the output
storage. At the end the driver exports the best checkpoint (by val mean IoU) as the model
artifact ``OUT/models/<run_id>/`` and commits the run's ``training``, ``runs`` and
``errors`` rows.

Failures: a worker that dies restarts the worker group from the latest checkpoint (up to
``max_failures`` times); a driver that dies leaves Ray Train's run state in the bucket, and
the same command with the same ``--run-id`` resumes from the latest checkpoint. Ray Train
registers a checkpoint only once every rank has uploaded its part, so a torn upload is never
restored.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args

import numpy as np
import pyarrow as pa
import torch
from ray.train import DataConfig
from torch.nn.parallel import DistributedDataParallel

from fcn.engine import evaluate, forward_backward
from fcn.models import BACKBONES, FCN, HEADS, build_model, load_backbone_weights
from fcn.optim import (
    OPTIMIZERS,
    SCHEDULES,
    OptimizerName,
    Schedule,
    build_optimizer,
    build_scheduler,
)
from fcn.surgery import transplant_fcn
from fcn.transforms import Normalization, describe_normalization, eval_transform, train_transform
from pipeline import storage
from pipeline.artifacts import ModelCard, load_artifact, load_card, model_uri, save_model
from pipeline.datasets import (
    DatasetConfig,
    ShuffleMode,
    iter_samples,
    iter_train_batches,
    load_manifest,
    manifest_hash,
    manifest_meta,
)
from pipeline.faults import Faults
from pipeline.storage import StorageOptions
from pipeline.tables import RunWriter, is_committed, new_run_id, validate_run_id

__all__ = [
    "CHECKPOINT_DIR",
    "ClassWeighting",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "restore",
    "train",
    "train_loop_per_worker",
    "was_resumed",
]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
"""Ray Train's run directories live under ``OUT/checkpoints/<run_id>/``."""

ClassWeighting = Literal["none", "median_frequency"]
PlacementStrategy = Literal["PACK", "SPREAD"]

_STATE_FILE = "state.pt"
_RESUMED_MARKER = "resumed"
"""Written beside the checkpoints by an attempt that restored one (see ``was_resumed``)."""
_T = TypeVar("_T")


_LOCAL_SHUFFLE_BATCHES = 4
"""Worker-local shuffle buffer, in batches, with ``shuffle="blocks"``."""


class TrainConfigError(ValueError):
    """A training configuration that cannot work with its dataset (the message says why)."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training job: what to train on what, how, where, and on how many workers."""

    # Read from JSON (flow parameters, Ray Jobs) by pydantic: an unknown field is an error,
    # not silently dropped. A plain dict, so this module needs no pydantic import.
    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}

    dataset_uri: str
    """Dataset root (VOC or images/ + masks/ layout) or manifest, with masks."""
    output_uri: str
    """Output root: the artifact, the checkpoints and the tables go under it."""
    run_id: str | None = None
    """Run id (letters, digits, ``._-``, starting with a letter); None: a new one."""
    model: str = "fcn8s"
    """FCN head: ``fcn32s``, ``fcn16s`` or ``fcn8s``."""
    backbone: str = "resnet18"
    """Backbone: one of ``fcn.models.BACKBONES``."""
    num_classes: int | None = None
    """Number of classes; None: the dataset's (from ``classes.txt`` or the VOC names)."""
    dropout: float = 0.5
    """Dropout after fc6 and fc7 (VGG16 only)."""
    train_split: str = "train"
    """Split trained on."""
    val_split: str | None = "val"
    """Split validated on each epoch at full image size; None: no validation."""
    crop_size: int = 256
    """Side of the square training crops (images smaller than a crop are padded, the mask
    with the ignore label)."""
    pad_crops: bool = True
    """Allow crops larger than the (scaled) images; False rejects such a config up front."""
    scale_range: tuple[float, float] = (0.5, 2.0)
    """Random rescale range before cropping; (1, 1) disables it."""
    hflip: bool = True
    """Random horizontal flips."""
    normalization: Normalization = "imagenet"
    """Input normalization (``caffe_bgr`` for the paper's Caffe VGG16 weights)."""
    batch_size: int = 8
    """Crops per worker per step (the global batch is ``num_workers`` times this)."""
    grad_accum: int = 1
    """Batches whose gradients are summed before each optimizer step."""
    epochs: int = 8
    """Passes over the train split."""
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
    amp: bool = False
    """bf16 autocast on GPU."""
    class_weighting: ClassWeighting = "none"
    """``median_frequency``: weight each class's loss by median frequency / its frequency in
    the train masks (Eigen & Fergus); ``none``: the paper's unweighted loss."""
    init_from: str | None = None
    """Model artifact to start from (staged training: FCN-16s from FCN-32s, FCN-8s from
    FCN-16s); every layer the two share is copied."""
    backbone_weights: str | None = None
    """Path or URI of a torchvision-format backbone state dict (nothing is downloaded)."""
    seed: int = 0
    """Seed of the weights' initialisation and of each rank's augmentation."""
    num_workers: int = 2
    """Ray Train workers (DDP ranks)."""
    use_gpu: bool = False
    """One GPU per worker (nccl); else CPU (gloo)."""
    cpus_per_worker: float | None = None
    """CPUs Ray reserves per worker; None: 1, or less on a small cluster, so that one CPU
    stays free for Ray Data (which feeds the workers: with none free, training waits)."""
    threads_per_worker: int | None = None
    """torch threads per worker; None: ``max(1, int(cpus_per_worker))``."""
    placement_strategy: PlacementStrategy = "PACK"
    """Where Ray places the workers: ``PACK`` fills nodes one after another (DDP traffic
    stays inside a node), ``SPREAD`` puts them on as many nodes as it can (each node's
    memory, disk and network serve fewer workers). Either way a lost worker restarts the
    whole group from the latest checkpoint."""
    max_failures: int = 2
    """Worker-group restarts from the latest checkpoint before the run fails."""
    shuffle: ShuffleMode = "rows"
    """Per-epoch shuffle of the train split: ``rows`` (a global shuffle, an all-to-all pass
    over the split each epoch), ``blocks`` (block order, plus a worker-local buffer of a few
    batches: much cheaper, a little less random) or ``none``."""
    overwrite: bool = False
    """Replace a committed run with the same id (its checkpoints and artifact too)."""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    """Reading and decoding options (limits, storage); masks are always required."""

    def __post_init__(self) -> None:
        if self.model not in HEADS:
            raise ValueError(f"unknown model {self.model!r}; expected one of {', '.join(HEADS)}")
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"unknown backbone {self.backbone!r}; expected one of {', '.join(BACKBONES)}"
            )
        if self.run_id is not None:
            validate_run_id(self.run_id)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.placement_strategy not in get_args(PlacementStrategy):
            raise ValueError(
                f"placement_strategy must be one of {get_args(PlacementStrategy)}, "
                f"got {self.placement_strategy!r}"
            )
        if self.class_weighting not in get_args(ClassWeighting):
            raise ValueError(
                f"class_weighting must be one of {get_args(ClassWeighting)}, "
                f"got {self.class_weighting!r}"
            )
        if self.num_classes is not None and not 1 <= self.num_classes <= 255:
            raise ValueError(f"num_classes must be in [1, 255], got {self.num_classes}")
        for name in ("crop_size", "batch_size", "grad_accum", "epochs", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.max_failures < 0:
            raise ValueError("warmup_steps and max_failures must be >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError("momentum must be in [0, 1) and weight_decay >= 0")
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high: {low, high}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise ValueError(f"threads_per_worker must be >= 1, got {self.threads_per_worker}")
        if self.amp and not self.use_gpu:
            raise ValueError("amp (bf16 autocast) needs use_gpu: on CPU it is slower, not faster")
        if self.val_split is not None and self.val_split == self.train_split:
            raise ValueError(f"train and val split are both {self.train_split!r}")
        if self.dataset.num_classes is not None:
            raise ValueError("set num_classes on TrainConfig, not on its DatasetConfig")
        object.__setattr__(self, "dataset", replace(self.dataset, require_masks=True))

    @property
    def threads(self) -> int:
        """torch threads per worker."""
        return self.threads_per_worker or max(1, int(self.cpus_per_worker or 1))

    @property
    def model_name(self) -> str:
        """``fcn.models.build_model`` name, e.g. ``fcn8s_resnet18``."""
        return f"{self.model}_{self.backbone}"


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    run_id: str
    """The run id."""
    model_uri: str
    """The model artifact."""
    scores: dict[str, Any]
    """Val metrics of the exported model (``fcn.metrics.scores``); empty without val."""
    epoch: int
    """The epoch (0-based) whose checkpoint was exported."""
    history: list[dict[str, Any]]
    """The ``training`` table rows, one per epoch."""
    resumed: bool
    """Whether the run continued from checkpoints of an earlier attempt."""
    seconds: float
    """Wall time of the whole call."""


@dataclass(frozen=True, kw_only=True)
class _Plan:
    """What every rank needs, worked out by the driver (pickled into the workers)."""

    config: TrainConfig
    run_id: str
    num_classes: int
    class_names: tuple[str, ...]
    batches_per_epoch: int
    total_steps: int
    has_val: bool
    checkpoint_root: str
    class_weight: tuple[float, ...] | None
    storage: StorageOptions
    faults: Faults | None = None


# ----------------------------------------------------------------------------- driver


def train(
    config: TrainConfig,
    *,
    echo: Callable[[str], None] = print,
    num_cpus: int | None = None,
    faults: Faults | None = None,
) -> TrainResult:
    """Run a training job to its committed model artifact and tables.

    Args:
        config: The job.
        echo: Where progress lines go.
        num_cpus: CPUs of the embedded Ray, if this call starts one (see ``ensure_ray``).
        faults: Testing only: where a rank fails or stalls (``pipeline.faults``).

    Raises:
        TrainConfigError: The configuration does not fit the dataset (before workers start).
        pipeline.tables.RunExistsError: The run is committed and ``overwrite`` is off.
        ray.train.TrainingFailedError: Training failed more than ``max_failures`` times.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.cluster import ensure_ray
    from pipeline.datasets import read_dataset, shuffle_each_epoch

    started = datetime.now(UTC)
    clock = time.perf_counter()
    run_id = config.run_id or new_run_id("train")
    options = config.dataset.storage.with_environment()
    out = storage.resolve(config.output_uri, options)
    meta, train_rows, val_rows, dataset_hash = _check_dataset(config, options)
    num_classes, class_names = _classes(config, meta.class_names)
    _check_sources(config, num_classes, options)
    if is_committed(out, run_id) and not config.overwrite:
        # RunWriter says the same; saying it before Ray starts saves a minute.
        RunWriter(out, run_id, "train")
    ckpt_loc = out.join(CHECKPOINT_DIR, run_id)

    ensure_ray(num_cpus=num_cpus)
    config = _fit_to_cluster(config, echo)
    data_config = replace(config.dataset, num_classes=num_classes)
    train_good, train_errors = read_dataset(
        train_rows, split=config.train_split, config=data_config, cache=True
    )
    error_rows = train_errors.take_all()
    num_train = train_good.count()
    val_good = None
    num_val = 0
    if val_rows is not None:
        val_good, val_errors = read_dataset(
            val_rows, split=config.val_split, config=data_config, cache=True
        )
        error_rows += val_errors.take_all()
        num_val = val_good.count()
    echo(
        f"run {run_id}: {num_train} train and {num_val} val images decoded, "
        f"{len(error_rows)} unreadable (see the errors table)"
    )
    per_rank = num_train // config.num_workers
    if per_rank == 0:
        raise TrainConfigError(
            f"{num_train} readable train image(s) for {config.num_workers} workers: every worker "
            "needs at least one"
        )
    if not config.pad_crops:
        _check_crop(config, train_good)
    class_weight = (
        _class_weights(train_good, num_classes) if config.class_weighting != "none" else None
    )
    # Every check has passed: only now may --overwrite delete the committed run.
    if config.overwrite:
        storage.delete(ckpt_loc)
    writer = RunWriter(out, run_id, "train", overwrite=config.overwrite)
    batches = math.ceil(per_rank / config.batch_size)
    steps_per_epoch = math.ceil(batches / config.grad_accum)
    ckpt_fs, ckpt_path = out.join(CHECKPOINT_DIR).pyarrow_fs()
    plan = _Plan(
        config=config,
        run_id=run_id,
        num_classes=num_classes,
        class_names=class_names,
        batches_per_epoch=batches,
        total_steps=steps_per_epoch * config.epochs,
        has_val=val_good is not None and num_val > 0,
        checkpoint_root=ckpt_loc.uri,
        class_weight=class_weight,
        storage=options,
        faults=faults,
    )
    datasets: dict[str, Any] = {"train": shuffle_each_epoch(train_good, config.shuffle)}
    if plan.has_val and val_good is not None:
        datasets["val"] = val_good
    score = "val_mean_iou_score" if plan.has_val else "epoch"
    trainer = TorchTrainer(
        functools.partial(train_loop_per_worker, plan),
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker or 1.0},
            placement_strategy=config.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_id,
            storage_path=ckpt_path,
            storage_filesystem=ckpt_fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            # Ray Train keeps the latest checkpoint besides the best num_to_keep.
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=score, checkpoint_score_order="max"
            ),
        ),
        datasets=datasets,
        dataset_config=_SplitConfig(),
    )
    result = trainer.fit()
    if result.error is not None:  # pragma: no cover - fit() raises in Ray 2.60
        raise result.error
    latest = result.checkpoint
    if latest is None:
        raise RuntimeError(f"run {run_id}: training reported no checkpoint")
    best = max(result.best_checkpoints or [(latest, {score: 0})], key=lambda cm: cm[1][score])[0]
    latest_state = _read_checkpoint(latest)
    best_state = latest_state if best.path == latest.path else _read_checkpoint(best)
    history = list(latest_state["history"])

    model = build_model(config.model_name, num_classes, **_model_options(config))
    model.load_state_dict(best_state["model"])
    uri = model_uri(out.uri, run_id)
    scores = dict(best_state["scores"])
    card = ModelCard(
        run_id=run_id,
        architecture=config.model,
        backbone=config.backbone,
        num_classes=num_classes,
        class_names=list(class_names),
        model_options=_model_options(config),
        normalization=describe_normalization(config.normalization),
        metrics={k: v for k, v in scores.items() if k != "confusion"},
        training_config={**_config_record(config), "exported_epoch": best_state["epoch"]},
        dataset_uri=config.dataset_uri,
        manifest_hash=dataset_hash,
        parent_model_uri=config.init_from,
    )
    save_model(model, card, out.join("models", run_id))
    finished = datetime.now(UTC)
    seconds = time.perf_counter() - clock
    writer.write("training", history)
    if error_rows:
        writer.write("errors", error_rows)
    writer.write(
        "runs",
        [
            {
                "kind": "train",
                "input_uri": config.dataset_uri,
                "model_uri": uri,
                "num_images": num_train,
                "num_errors": len(error_rows),
                "pixel_acc": scores.get("pixel_acc"),
                "mean_acc": scores.get("mean_acc"),
                "mean_iou": scores.get("mean_iou"),
                "fw_iou": scores.get("fw_iou"),
                "class_names": list(class_names),
                "class_iou": _floats(scores.get("iou")),
                "started_at": started,
                "finished_at": finished,
                "images_per_s": _mean([row["images_per_s"] for row in history]),
            }
        ],
    )
    writer.commit({"model_uri": uri, "exported_epoch": best_state["epoch"]}, finished_at=finished)
    return TrainResult(
        run_id=run_id,
        model_uri=uri,
        scores=scores,
        epoch=int(best_state["epoch"]),
        history=history,
        resumed=was_resumed(ckpt_loc.uri, options),
        seconds=seconds,
    )


def _fit_to_cluster(config: TrainConfig, echo: Callable[[str], None]) -> TrainConfig:
    """Choose CPUs per worker, leaving one CPU of the cluster to Ray Data.

    Ray Data's tasks (the per-epoch shuffle and split) need a CPU while the workers hold
    theirs; with none free, the workers wait for their first batch until one frees up.
    """
    import ray

    total = float(ray.cluster_resources().get("CPU", 0.0))
    spare = total - 1.0
    if config.cpus_per_worker is None:
        per_worker = (
            1.0
            if spare >= config.num_workers
            else math.floor(spare / config.num_workers * 100) / 100
        )
        if per_worker < 0.05:
            raise TrainConfigError(
                f"{config.num_workers} worker(s) do not fit a Ray cluster of {total:g} CPUs with "
                "one CPU left for Ray Data: use fewer workers or a bigger cluster"
            )
        return replace(config, cpus_per_worker=per_worker)
    if config.num_workers * config.cpus_per_worker > spare:
        # A warning, not an error: an autoscaling cluster grows when the workers ask.
        echo(
            f"warning: {config.num_workers} workers x {config.cpus_per_worker:g} CPUs leave "
            f"no CPU of the cluster's {total:g} now to Ray Data, which feeds the workers; "
            "unless the cluster scales up, training waits. Lower --cpus-per-worker (torch "
            "threads are set apart, with --threads-per-worker)."
        )
    return config


def _check_dataset(
    config: TrainConfig, options: StorageOptions
) -> tuple[Any, pa.Table, pa.Table | None, str]:
    """The manifest rows of the train and val splits, checked; the manifest's metadata."""
    from pipeline.datasets import DatasetError

    if not storage.exists(config.dataset_uri, options):
        raise TrainConfigError(f"no dataset at {config.dataset_uri}")
    try:
        train_rows = load_manifest(
            config.dataset_uri, config.train_split, layout=config.dataset.layout, options=options
        )
        val_rows = None
        if config.val_split is not None:
            val_rows = load_manifest(
                config.dataset_uri, config.val_split, layout=config.dataset.layout, options=options
            )
    except DatasetError as exc:
        raise TrainConfigError(str(exc)) from None
    without_masks = train_rows.filter(pa.compute.is_null(train_rows["mask_uri"])).num_rows
    if without_masks == train_rows.num_rows:
        raise TrainConfigError(
            f"{config.dataset_uri}: the {config.train_split!r} split has no masks; training needs "
            "a VOC or images/ + masks/ layout"
        )
    return manifest_meta(train_rows), train_rows, val_rows, manifest_hash(train_rows)


def _classes(config: TrainConfig, names: tuple[str, ...] | None) -> tuple[int, tuple[str, ...]]:
    if names is None:
        if config.num_classes is None:
            raise TrainConfigError(
                f"{config.dataset_uri} names no classes (no classes.txt): pass num_classes "
                "(--num-classes)"
            )
        return config.num_classes, tuple(f"class_{i}" for i in range(config.num_classes))
    if config.num_classes is not None and config.num_classes != len(names):
        raise TrainConfigError(
            f"num_classes={config.num_classes} does not match the dataset's {len(names)} "
            f"classes ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})"
        )
    return len(names), names


def _check_sources(config: TrainConfig, num_classes: int, options: StorageOptions) -> None:
    """The init artifact and backbone weights exist and fit, before any worker starts."""
    if config.init_from is not None:
        card = load_card(config.init_from, options)
        if card.backbone != config.backbone or card.num_classes != num_classes:
            raise TrainConfigError(
                f"--init-from {config.init_from} is a {card.architecture} {card.backbone} with "
                f"{card.num_classes} classes; this run trains a {config.model} "
                f"{config.backbone} with {num_classes}"
            )
    if config.backbone_weights is not None and not storage.exists(config.backbone_weights, options):
        raise TrainConfigError(f"--backbone-weights {config.backbone_weights}: no such file")


def _check_crop(config: TrainConfig, train_good: Any) -> None:
    smallest = min(
        train_good.min("height"), train_good.min("width")
    )  # materialized: a cheap aggregate
    if config.crop_size > smallest * config.scale_range[0]:
        raise TrainConfigError(
            f"crop_size {config.crop_size} exceeds the smallest train image side ({smallest} px"
            f" at scale {config.scale_range[0]}) and pad_crops is off"
        )


def _class_weights(train_good: Any, num_classes: int) -> tuple[float, ...]:
    """Median-frequency class weights from the train masks (classes never seen get 1)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for batch in train_good.iter_batches(batch_format="pyarrow", batch_size=64):
        for mask in batch["mask"].to_pylist():
            labels = np.frombuffer(mask, dtype=np.uint8)
            counts += np.bincount(labels[labels < num_classes], minlength=num_classes)
    freq = counts / max(1, counts.sum())
    median = float(np.median(freq[freq > 0])) if (freq > 0).any() else 1.0
    return tuple(float(median / f) if f > 0 else 1.0 for f in freq)


def _model_options(config: TrainConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"backbone": config.backbone}
    if config.backbone == "vgg16":
        options["dropout"] = config.dropout
    return options


def _config_record(config: TrainConfig) -> dict[str, Any]:
    """The config as the model card keeps it (storage options are dropped by the card)."""
    record = {name: getattr(config, name) for name in config.__dataclass_fields__}
    record.pop("overwrite")
    return record


def _floats(values: Any) -> list[float | None] | None:
    if values is None:
        return None
    return [None if math.isnan(v) else float(v) for v in values]


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _read_checkpoint(checkpoint: Any) -> dict[str, Any]:
    with checkpoint.as_directory() as directory:
        state: dict[str, Any] = torch.load(
            Path(directory) / _STATE_FILE, map_location="cpu", weights_only=True
        )
    return state


class _SplitConfig(DataConfig):
    """Train split equally across ranks (DDP needs equal step counts); val split unequally.

    Ray Train's default ``DataConfig`` splits every dataset with ``equal=True``, which
    drops up to ``num_workers - 1`` rows; for validation every image must be scored once.
    """

    def __init__(self) -> None:
        super().__init__(datasets_to_split=["train"])

    def configure(
        self, datasets: dict[str, Any], world_size: int, *args: Any, **kwargs: Any
    ) -> list[dict[str, Any]]:
        """Assign each rank its train and val iterators."""
        others = {name: ds for name, ds in datasets.items() if name != "val"}
        out: list[dict[str, Any]] = super().configure(others, world_size, *args, **kwargs)
        if "val" in datasets:
            val = datasets["val"].copy(datasets["val"])
            val.context.execution_options = self._resolve_execution_options("val")
            for rank, split in enumerate(val.streaming_split(world_size, equal=False)):
                out[rank]["val"] = split
        return out


# ----------------------------------------------------------------------------- worker


def train_loop_per_worker(plan: _Plan) -> None:
    """One rank of the run: restore, then per epoch train, validate, checkpoint, report."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    config = plan.config
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(config.threads)
    device = ray.train.torch.get_device()

    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    torch.manual_seed(config.seed)
    model = _initial_model(plan)
    optimizer = build_optimizer(
        model,
        config.optimizer,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    scheduler = build_scheduler(
        optimizer,
        total_steps=plan.total_steps,
        warmup_steps=config.warmup_steps,
        schedule=config.schedule,
    )
    checkpoint = ray.train.get_checkpoint()
    start_epoch, history = 0, list[dict[str, Any]]()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start_epoch, history = restore(Path(directory), plan, rank, model, optimizer, scheduler)
    else:
        # Different augmentation per rank, reproducible per seed.
        _seed_all(config.seed * 1000 + rank)

    # DDP: parameters are broadcast from rank 0 here, and each backward pass all-reduces
    # (averages) the gradients, so every rank steps identically.
    ddp_model = ray.train.torch.prepare_model(model)
    class_weight = (
        None if plan.class_weight is None else torch.tensor(plan.class_weight, device=device)
    )
    autocast = torch.bfloat16 if config.amp else None
    augment = train_transform(
        config.crop_size,
        scale_range=config.scale_range,
        hflip_prob=0.5 if config.hflip else 0.0,
        normalization=config.normalization,
    )
    to_input = eval_transform(normalization=config.normalization)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if plan.has_val else None
    faults = plan.faults

    for epoch in range(start_epoch, config.epochs):
        ddp_model.train()
        began = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        batches = images_seen = 0
        lr = optimizer.param_groups[0]["lr"]  # the last step's, reported per epoch
        optimizer.zero_grad(set_to_none=True)
        batches_iter = iter_train_batches(
            train_shard,
            transform=augment,
            batch_size=config.batch_size,
            # "blocks" only reorders whole blocks: mix rows across a few of them too, so a
            # batch is not the same rows every epoch.
            local_shuffle_buffer_size=(
                _LOCAL_SHUFFLE_BATCHES * config.batch_size if config.shuffle == "blocks" else None
            ),
            device=device,
        )
        for index, (batch, last) in enumerate(_with_last(batches_iter)):
            if faults is not None:
                faults.train_fault(plan.checkpoint_root, rank, epoch, index)
            step_now = last or (index + 1) % config.grad_accum == 0
            # Accumulating: skip DDP's gradient all-reduce on all but the micro-batch that
            # steps. Every rank sees the same number of batches (Ray splits the train set
            # with equal=True), so all ranks reach each synchronising backward together.
            sync: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            if not step_now and isinstance(ddp_model, DistributedDataParallel):
                sync = ddp_model.no_sync()
            with sync:
                loss_sum += forward_backward(
                    ddp_model,
                    batch.images,
                    batch.masks,
                    # Mean over the batches of this step's group (the last may be short).
                    loss_scale=1.0 / _group_size(index, config.grad_accum, plan.batches_per_epoch),
                    class_weight=class_weight,
                    autocast_dtype=autocast,
                )
            if step_now:
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            batches += 1
            images_seen += len(batch.image_ids)
        elapsed = time.perf_counter() - began
        # One all-reduce per epoch (not per step: reading a loss syncs the device).
        totals = torch.tensor(
            [float(loss_sum), batches, images_seen], dtype=torch.float64, device=device
        )
        _all_reduce(totals)
        train_loss = float(totals[0] / max(1.0, float(totals[1])))
        images_per_s = float(totals[2]) / elapsed if elapsed > 0 else 0.0

        scores: dict[str, Any] = {}
        if val_shard is not None:
            samples = (
                to_input(s.image, s.mask if s.mask is not None else _no_mask(s.image_uri))
                for s in iter_samples(val_shard)
            )
            # Each rank scores its share of the val images; the sum of the matrices is the
            # matrix of the whole split, so every rank computes the same metrics.
            # DDP broadcasts rank 0's buffers at each forward, but the last one updated each
            # rank's BatchNorm statistics from its own batch: score with rank 0's, the ones
            # the checkpoint keeps.
            _broadcast_buffers(model)
            confusion = evaluate(model, samples, plan.num_classes, device=device).reduce()
            scores = confusion.scores()
            scores["confusion"] = confusion.matrix.cpu()
        ckpt_dir_name = f"epoch_{epoch:04d}"
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_pixel_acc": _nan_none(scores.get("pixel_acc")),
            "val_mean_iou": _nan_none(scores.get("mean_iou")),
            "lr": lr,
            "images_per_s": images_per_s,
            "checkpoint_uri": storage.join(plan.checkpoint_root, ckpt_dir_name),
        }
        history.append(row)
        metrics = {
            **{k: v for k, v in row.items() if k != "checkpoint_uri"},
            # NaN sorts oddly: an undefined mean IoU scores below every defined one.
            "val_mean_iou_score": row["val_mean_iou"] if row["val_mean_iou"] is not None else -1.0,
        }
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(_rng_state(), Path(tmp) / f"rng_rank{rank}.pt")
            if rank == 0:
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "history": history,
                        "scores": _plain_scores(scores),
                    },
                    Path(tmp) / _STATE_FILE,
                )
            # A barrier: every rank uploads its part to the same directory, and Ray Train
            # registers the checkpoint once all have, so a torn upload is never restored.
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(tmp),
                checkpoint_dir_name=ckpt_dir_name,
            )
        if rank == 0:
            val = (
                f", val pixel acc {row['val_pixel_acc']:.3f}, mean IoU {row['val_mean_iou']:.3f}"
                if row["val_mean_iou"] is not None
                else ""
            )
            print(
                f"epoch {epoch + 1}/{config.epochs}: train loss {train_loss:.4f}{val}, "
                f"lr {lr:.2e}, {images_per_s:.1f} img/s",
                flush=True,
            )


def _group_size(index: int, accum: int, batches: int) -> int:
    """Batches in the accumulation group of batch ``index`` (the last group may be short)."""
    start = index - index % accum
    return max(1, min(accum, batches - start))


def restore(
    directory: Path,
    plan: _Plan,
    rank: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> tuple[int, list[dict[str, Any]]]:
    """Load a checkpoint into this rank's model, optimizer, scheduler and RNG.

    Returns the epoch to start at and the history so far. Rank 0 also marks the run as
    resumed (:func:`was_resumed`), even when every epoch is already done and no further
    checkpoint will be written.
    """
    state = torch.load(directory / _STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_file = directory / f"rng_rank{rank}.pt"
    if rng_file.exists():
        _set_rng(torch.load(rng_file, weights_only=True))
    start_epoch = int(state["epoch"]) + 1
    if rank == 0:
        storage.write_bytes(storage.join(plan.checkpoint_root, _RESUMED_MARKER), b"", plan.storage)
        print(f"run {plan.run_id}: resumed after epoch {start_epoch}", flush=True)
    return start_epoch, list(state["history"])


def was_resumed(checkpoint_root: str, options: StorageOptions | None = None) -> bool:
    """Whether any attempt of the run under ``checkpoint_root`` restored a checkpoint."""
    return storage.exists(storage.join(checkpoint_root, _RESUMED_MARKER), options)


def _initial_model(plan: _Plan) -> FCN:
    """The model before training: fresh, plus backbone weights or a coarser FCN."""
    config = plan.config
    model = build_model(config.model_name, plan.num_classes, **_model_options(config))
    if config.backbone_weights is not None:
        data = storage.read_bytes(config.backbone_weights, plan.storage, max_bytes=2**31)
        import io

        report = load_backbone_weights(model, io.BytesIO(data))
        logger.info("backbone weights: %d tensors loaded", len(report.loaded))
    if config.init_from is not None:
        source, _ = load_artifact(config.init_from, options=plan.storage)
        transplant_fcn(model, source.state_dict())
    device = _device()
    return model.to(device)


def _device() -> torch.device:
    import ray.train.torch

    return ray.train.torch.get_device()


def _broadcast_buffers(model: torch.nn.Module) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _all_reduce(tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def _with_last(items: Iterable[_T]) -> Iterator[tuple[_T, bool]]:
    """Each item with whether it is the last one (a one-item lookahead)."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for upcoming in iterator:
        yield current, False
        current = upcoming
    yield current, True


def _no_mask(uri: str) -> np.ndarray:
    raise RuntimeError(f"{uri}: a val image without a mask (read with require_masks)")


def _nan_none(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number


def _plain_scores(scores: dict[str, Any]) -> dict[str, Any]:
    """Scores as floats, lists and tensors (what ``torch.load(weights_only=True)`` reads)."""
    out: dict[str, Any] = {}
    for key, value in scores.items():
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, np.ndarray):
            out[key] = [float(v) for v in value.tolist()]
        else:
            out[key] = float(value)
    return out


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """This rank's RNG state (the transforms draw from torch's; Python's for completeness)."""
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def _set_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
