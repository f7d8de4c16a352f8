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

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from ray.train import DataConfig

from fcn.losses import median_frequency_weights
from fcn.models import build_model
from fcn.transforms import describe_normalization
from pipeline import storage
from pipeline.artifacts import ModelCard, load_card, model_uri, save_model
from pipeline.console import progress_sink
from pipeline.data.layouts import load_manifest, manifest_hash, manifest_meta
from pipeline.faults import Faults
from pipeline.plan import TrainPlan
from pipeline.progress import Board, ProgressSink
from pipeline.storage import StorageOptions
from pipeline.store.read import check_not_committed
from pipeline.store.runs import RunWriter
from pipeline.tables import new_run_id, runs_row
from pipeline.train.config import TrainConfig, TrainConfigError
from pipeline.train.progress import TrainView
from pipeline.train.worker import (
    CHECKPOINT_DIR,
    Plan,
    read_checkpoint,
    train_loop_per_worker,
    was_resumed,
)

__all__ = ["TrainResult", "train"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    run_id: str
    """Under which id the run committed (given, or made up)."""
    model_uri: str
    """The model artifact (``OUT/models/<run_id>``), of the best epoch."""
    scores: dict[str, Any]
    """Val metrics of the exported model (``fcn.metrics.scores``); empty without val."""
    epoch: int
    """The epoch (0-based) whose checkpoint was exported."""
    history: list[dict[str, Any]]
    """The ``training`` table rows, one per epoch."""
    compute: dict[str, Any]
    """The precision policy the workers ran (``pipeline.compute.ComputePlan.record``)."""
    resumed: bool
    """Whether the run continued from checkpoints of an earlier attempt."""
    seconds: float
    """Wall time of the whole call."""


def train(
    config: TrainConfig,
    *,
    echo: Callable[[str], None] = print,
    num_cpus: int | None = None,
    faults: Faults | None = None,
    progress: ProgressSink | None = None,
) -> TrainResult:
    """Run a training job to its committed model artifact and tables.

    Preflight (the configuration against the dataset, before Ray starts), decode the splits
    once, plan the run, fit it on Ray Train, export the best checkpoint, commit the tables.

    Args:
        config: The job.
        echo: Where the job's lines go (its plan, warnings).
        num_cpus: CPUs of the embedded Ray, if this call starts one (see ``ensure_ray``).
        faults: Testing only: where a rank fails or stalls (``pipeline.faults``).
        progress: Where the ``decoding`` and ``training`` progress goes (default: the
            console's, ``pipeline.console.progress_sink``).

    Raises:
        TrainConfigError: The configuration does not fit the dataset (before workers start).
        pipeline.tables.RunExistsError: The run is committed and ``overwrite`` is off.
        ray.train.TrainingFailedError: Training failed more than ``max_failures`` times.
    """
    from pipeline.cluster import ensure_ray

    started = datetime.now(UTC)
    clock = time.perf_counter()
    job = _preflight(config, config.run_id or new_run_id("train"))
    ensure_ray(num_cpus=num_cpus)
    sizing = _fit_to_cluster(config, echo)
    images = job.train_rows.num_rows + (0 if job.val_rows is None else job.val_rows.num_rows)
    view = TrainView(
        progress or progress_sink(), images=images, epochs=config.optim.epochs, run_id=job.run_id
    )
    board = Board.start()
    try:
        with board.follow(view.show):
            data = _decode(config, job, sizing, echo, board)
            view.decoded(train=data.num_train, val=data.num_val, errors=len(data.error_rows))
            plan = _plan(config, job, data, sizing, faults, board)
            # Every check has passed: only now may --overwrite delete the committed run.
            if config.overwrite:
                storage.delete(plan.checkpoint_root, job.options)
            writer = RunWriter(job.out, job.run_id, "train", overwrite=config.overwrite)
            view.start_training(
                steps=plan.batches_per_epoch,
                images_per_step=config.optim.batch_size * sizing.num_workers,
            )
            result = _fit(plan, data, job)
    finally:
        board.close()
    exported = _export(config, plan, job, result)
    view.trained(exported.history)
    finished = datetime.now(UTC)
    writer.write("training", exported.history)
    if data.error_rows:
        writer.write("errors", data.error_rows)
    rates = [row["images_per_s"] for row in exported.history if row["images_per_s"] is not None]
    writer.write(
        "runs",
        [
            runs_row(
                kind="train",
                input_uri=config.dataset_uri,
                model_uri=exported.model_uri,
                num_images=data.num_train,
                num_errors=len(data.error_rows),
                scores=exported.scores,
                class_names=job.class_names,
                started_at=started,
                finished_at=finished,
                images_per_s=sum(rates) / len(rates) if rates else None,
                precision=exported.compute.get("precision"),
                channels_last=exported.compute.get("channels_last"),
                engine=f"torch {torch.__version__.split('+')[0]}",
                plan=sizing.describe(),
            )
        ],
    )
    writer.commit(
        {"model_uri": exported.model_uri, "exported_epoch": exported.epoch}, finished_at=finished
    )
    return TrainResult(
        run_id=job.run_id,
        model_uri=exported.model_uri,
        scores=exported.scores,
        epoch=exported.epoch,
        history=exported.history,
        compute=exported.compute,
        resumed=was_resumed(plan.checkpoint_root, job.options),
        seconds=time.perf_counter() - clock,
    )


@dataclass(frozen=True, kw_only=True)
class _Job:
    """What the preflight established about the job, before Ray starts."""

    run_id: str
    options: StorageOptions
    out: storage.Location
    train_rows: pa.Table
    val_rows: pa.Table | None
    dataset_hash: str
    num_classes: int
    class_names: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class _Decoded:
    """The decoded splits, in Ray's object store, and the objects that failed."""

    train_good: Any
    val_good: Any | None
    num_train: int
    num_val: int
    error_rows: list[dict[str, Any]]


@dataclass(frozen=True, kw_only=True)
class _Exported:
    """The model artifact of the best checkpoint, and the run's history."""

    model_uri: str
    scores: dict[str, Any]
    epoch: int
    history: list[dict[str, Any]]
    compute: dict[str, Any]


def _preflight(config: TrainConfig, run_id: str) -> _Job:
    """Check the configuration against the dataset and the output root, before Ray starts."""
    options = config.data.read.storage.with_environment()
    out = storage.resolve(config.output_uri, options)
    meta, train_rows, val_rows, dataset_hash = _check_dataset(config, options)
    num_classes, class_names = _classes(config, meta.class_names)
    _check_sources(config, num_classes, options)
    check_not_committed(out, run_id, config.overwrite)  # before Ray starts: saves a minute
    return _Job(
        run_id=run_id,
        options=options,
        out=out,
        train_rows=train_rows,
        val_rows=val_rows,
        dataset_hash=dataset_hash,
        num_classes=num_classes,
        class_names=class_names,
    )


def _decode(
    config: TrainConfig, job: _Job, sizing: TrainPlan, echo: Callable[[str], None], board: Board
) -> _Decoded:
    """Decode the train and val splits once into Ray's object store (bad objects apart)."""
    from pipeline.data.reading import read_dataset

    def read(rows: pa.Table) -> tuple[Any, Any]:
        return read_dataset(
            rows,
            config=config.data.read,
            num_classes=job.num_classes,
            require_masks=True,
            cache=True,
            progress=board.handle,
        )

    train_good, train_errors = read(job.train_rows)
    error_rows = train_errors.take_all()
    val_good, num_val = None, 0
    if job.val_rows is not None:
        val_good, val_errors = read(job.val_rows)
        error_rows += val_errors.take_all()
        num_val = val_good.count()
    num_train = train_good.count()
    if error_rows:
        echo(f"run {job.run_id}: {len(error_rows)} image(s) unreadable, see the errors table")
    workers = sizing.num_workers
    if num_train < workers:
        raise TrainConfigError(
            f"{num_train} readable train image(s) for {workers} workers: every worker needs "
            "at least one"
        )
    if not config.data.pad_crops:
        _check_crop(config, train_good)
    return _Decoded(
        train_good=train_good,
        val_good=val_good if num_val else None,
        num_train=num_train,
        num_val=num_val,
        error_rows=error_rows,
    )


def _plan(
    config: TrainConfig,
    job: _Job,
    data: _Decoded,
    sizing: TrainPlan,
    faults: Faults | None,
    board: Board,
) -> Plan:
    """What every rank needs: class count and weights, steps, where checkpoints go."""
    batches = math.ceil(data.num_train // sizing.num_workers / config.optim.batch_size)
    steps_per_epoch = math.ceil(batches / config.optim.grad_accum)
    class_weight = None
    if config.optim.class_weighting != "none":
        class_weight = _class_weights(data.train_good, job.num_classes)
    return Plan(
        config=config,
        run_id=job.run_id,
        num_classes=job.num_classes,
        class_names=job.class_names,
        batches_per_epoch=batches,
        total_steps=steps_per_epoch * config.optim.epochs,
        has_val=data.val_good is not None,
        checkpoint_root=job.out.join(CHECKPOINT_DIR, job.run_id).uri,
        class_weight=class_weight,
        storage=job.options,
        sizing=sizing,
        faults=faults,
        board=board.handle,
    )


_SCORE = "val_mean_iou_score"
"""The metric Ray Train keeps the best checkpoint by (the epoch, without a val split)."""


def _fit(plan: Plan, data: _Decoded, job: _Job) -> Any:
    """Run the ranks on Ray Train to the end; its ``Result`` (checkpoints registered)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.data.batches import shuffle_each_epoch

    config = plan.config
    datasets: dict[str, Any] = {"train": shuffle_each_epoch(data.train_good, config.data.shuffle)}
    if data.val_good is not None:
        datasets["val"] = data.val_good
    ckpt_fs, ckpt_path = job.out.join(CHECKPOINT_DIR).pyarrow_fs()
    trainer = TorchTrainer(
        functools.partial(train_loop_per_worker, plan),
        scaling_config=ScalingConfig(
            num_workers=plan.sizing.num_workers,
            use_gpu=plan.sizing.use_gpu,
            resources_per_worker={"CPU": plan.sizing.cpus_per_worker},
            placement_strategy=plan.sizing.placement_strategy,
        ),
        run_config=RunConfig(
            name=plan.run_id,
            storage_path=ckpt_path,
            storage_filesystem=ckpt_fs,
            failure_config=FailureConfig(max_failures=config.scaling.max_failures),
            # Ray Train keeps the latest checkpoint besides the best num_to_keep.
            checkpoint_config=CheckpointConfig(
                num_to_keep=1,
                checkpoint_score_attribute=_SCORE if plan.has_val else "epoch",
                checkpoint_score_order="max",
            ),
        ),
        datasets=datasets,
        dataset_config=_SplitConfig(),
    )
    result = trainer.fit()
    if result.error is not None:  # pragma: no cover - fit() raises in Ray 2.60
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"run {plan.run_id}: training reported no checkpoint")
    return result


def _export(config: TrainConfig, plan: Plan, job: _Job, result: Any) -> _Exported:
    """Save the best checkpoint's model as the run's artifact, with its card."""
    score = _SCORE if plan.has_val else "epoch"
    latest = result.checkpoint
    best = max(result.best_checkpoints or [(latest, {score: 0})], key=lambda cm: cm[1][score])[0]
    latest_state = read_checkpoint(latest)
    best_state = latest_state if best.path == latest.path else read_checkpoint(best)
    model = build_model(config.model.name, job.num_classes, **config.model.options)
    model.load_state_dict(best_state["model"])
    scores = dict(best_state["scores"])
    card = ModelCard(
        run_id=job.run_id,
        architecture=config.model.head,
        backbone=config.model.backbone,
        num_classes=job.num_classes,
        class_names=list(job.class_names),
        model_options=config.model.options,
        normalization=describe_normalization(config.model.normalization),
        metrics={k: v for k, v in scores.items() if k != "confusion"},
        training_config={
            **_config_record(config),
            "exported_epoch": best_state["epoch"],
            "compute_used": latest_state.get("compute", {}),
        },
        dataset_uri=config.dataset_uri,
        manifest_hash=job.dataset_hash,
        parent_model_uri=config.model.init_from,
    )
    save_model(model, card, job.out.join("models", job.run_id))
    return _Exported(
        model_uri=model_uri(job.out.uri, job.run_id),
        scores=scores,
        epoch=int(best_state["epoch"]),
        history=list(latest_state["history"]),
        compute=dict(latest_state.get("compute", {})),
    )


def _fit_to_cluster(config: TrainConfig, echo: Callable[[str], None]) -> TrainPlan:
    """The ranks on this cluster (:func:`pipeline.plan.plan_train`), printed once.

    One CPU of the cluster stays with Ray Data: its tasks (the per-epoch shuffle and split)
    need a CPU while the workers hold theirs; with none free, the workers wait for their
    first batch until one frees up.
    """
    from pipeline.plan import PlanError, detect_resources, plan_train

    try:
        sizing = plan_train(detect_resources(), config.scaling)
    except PlanError as exc:
        raise TrainConfigError(str(exc)) from None
    echo(sizing.describe())
    for warning in sizing.warnings:
        echo(f"warning: {warning}")
    return sizing


def _check_dataset(
    config: TrainConfig, options: StorageOptions
) -> tuple[Any, pa.Table, pa.Table | None, str]:
    """The manifest rows of the train and val splits, checked; the manifest's metadata."""
    from pipeline.data.layouts import DatasetError

    if not storage.exists(config.dataset_uri, options):
        raise TrainConfigError(f"no dataset at {config.dataset_uri}")
    try:
        train_rows = load_manifest(
            config.dataset_uri,
            config.data.train_split,
            layout=config.data.read.layout,
            options=options,
        )
        val_rows = None
        if config.data.val_split is not None:
            val_rows = load_manifest(
                config.dataset_uri,
                config.data.val_split,
                layout=config.data.read.layout,
                options=options,
            )
    except DatasetError as exc:
        raise TrainConfigError(str(exc)) from None
    without_masks = train_rows.filter(pa.compute.is_null(train_rows["mask_uri"])).num_rows
    if without_masks == train_rows.num_rows:
        raise TrainConfigError(
            f"{config.dataset_uri}: the {config.data.train_split!r} split has no masks; "
            "training needs a VOC or images/ + masks/ layout"
        )
    return manifest_meta(train_rows), train_rows, val_rows, manifest_hash(train_rows)


def _classes(config: TrainConfig, names: tuple[str, ...] | None) -> tuple[int, tuple[str, ...]]:
    if names is None:
        if config.model.num_classes is None:
            raise TrainConfigError(
                f"{config.dataset_uri} names no classes (no classes.txt): pass num_classes "
                "(--num-classes)"
            )
        return config.model.num_classes, tuple(
            f"class_{i}" for i in range(config.model.num_classes)
        )
    if config.model.num_classes is not None and config.model.num_classes != len(names):
        raise TrainConfigError(
            f"num_classes={config.model.num_classes} does not match the dataset's {len(names)} "
            f"classes ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})"
        )
    return len(names), names


def _check_sources(config: TrainConfig, num_classes: int, options: StorageOptions) -> None:
    """The init artifact and backbone weights exist and fit, before any worker starts."""
    if config.model.init_from is not None:
        card = load_card(config.model.init_from, options)
        if card.backbone != config.model.backbone or card.num_classes != num_classes:
            raise TrainConfigError(
                f"--init-from {config.model.init_from} is a {card.architecture} {card.backbone} "
                f"with {card.num_classes} classes; this run trains a {config.model.head} "
                f"{config.model.backbone} with {num_classes}"
            )
    if config.model.backbone_weights is not None and not storage.exists(
        config.model.backbone_weights, options
    ):
        raise TrainConfigError(f"--backbone-weights {config.model.backbone_weights}: no such file")


def _check_crop(config: TrainConfig, train_good: Any) -> None:
    smallest = min(
        train_good.min("height"), train_good.min("width")
    )  # materialized: a cheap aggregate
    if config.data.crop_size > smallest * config.data.scale_range[0]:
        raise TrainConfigError(
            f"crop_size {config.data.crop_size} exceeds the smallest train image side "
            f"({smallest} px at scale {config.data.scale_range[0]}) and pad_crops is off"
        )


def _class_weights(train_good: Any, num_classes: int) -> tuple[float, ...]:
    """Median-frequency class weights from the train masks (classes never seen get 1)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for batch in train_good.iter_batches(batch_format="pyarrow", batch_size=64):
        for mask in batch["mask"].to_pylist():
            labels = np.frombuffer(mask, dtype=np.uint8)
            counts += np.bincount(labels[labels < num_classes], minlength=num_classes)
    return median_frequency_weights(counts)


def _config_record(config: TrainConfig) -> dict[str, Any]:
    """The config as the model card keeps it: JSON values, sections as dicts (storage
    options hold no secrets; the card refuses any)."""
    from pipeline.config import dump

    record = dump(config)
    record.pop("overwrite")
    return record


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
