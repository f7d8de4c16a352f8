"""One rank of a training run (``train_loop_per_worker``): restore, then per epoch train,
validate, checkpoint and report.
"""

from __future__ import annotations

import contextlib
import logging
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from fcn.engine import Compute, evaluate, forward_backward
from fcn.metrics import nan_to_none
from fcn.models import FCN, build_model, load_backbone_weights
from fcn.optim import (
    build_optimizer,
    build_scheduler,
)
from fcn.surgery import transplant_fcn
from fcn.transforms import eval_transform, train_transform
from pipeline import storage
from pipeline.artifacts import load_artifact
from pipeline.compute import ComputePlan, resolve, training_probe
from pipeline.console import tell
from pipeline.data.batches import iter_samples, iter_train_batches
from pipeline.faults import Faults
from pipeline.plan import TrainPlan
from pipeline.storage import StorageOptions
from pipeline.train.config import TrainConfig
from pipeline.train.progress import Beacon, TrainStatus

__all__ = [
    "CHECKPOINT_DIR",
    "Plan",
    "read_checkpoint",
    "restore",
    "train_loop_per_worker",
    "was_resumed",
]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
"""Ray Train's run directories live under ``OUT/checkpoints/<run_id>/``."""


_STATE_FILE = "state.pt"


_RESUMED_MARKER = "resumed"
"""Written beside the checkpoints by an attempt that restored one (see ``was_resumed``)."""


_T = TypeVar("_T")


_LOCAL_SHUFFLE_BATCHES = 4
"""Worker-local shuffle buffer, in batches, with ``shuffle="blocks"``."""


@dataclass(frozen=True, kw_only=True)
class Plan:
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
    sizing: TrainPlan
    """Ranks, threads, placement (``pipeline.plan``)."""
    faults: Faults | None = None
    board: Any = None
    """The run's progress board (``pipeline.progress.Board.handle``): rank 0 posts to it."""


def train_loop_per_worker(plan: Plan) -> None:
    """One rank of the run: restore, then per epoch train, validate, checkpoint, report."""
    import ray.train

    config = plan.config
    rank = _Rank.start(plan)
    beacon = Beacon(plan.board if rank.rank == 0 else None)
    checkpoint = ray.train.get_checkpoint()
    start_epoch, history = 0, list[dict[str, Any]]()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start_epoch, history = restore(
                Path(directory), plan, rank.rank, rank.model, rank.optimizer, rank.scheduler
            )
    else:
        # Different augmentation per rank, reproducible per seed.
        _seed_all(config.optim.seed * 1000 + rank.rank)
    if history:
        beacon.val_mean_iou = history[-1]["val_mean_iou"]
    for epoch in range(start_epoch, config.optim.epochs):
        epoch_stats = train_one_epoch(rank, epoch, beacon)
        steps, loss = rank.plan.batches_per_epoch, epoch_stats["train_loss"]
        beacon.post(_status(rank, epoch, steps, loss, beacon, validating=True))
        scores = validate(rank)
        row = {
            "epoch": epoch,
            **epoch_stats,
            "val_pixel_acc": nan_to_none(scores.get("pixel_acc")),
            "val_mean_iou": nan_to_none(scores.get("mean_iou")),
            "checkpoint_uri": storage.join(plan.checkpoint_root, _checkpoint_name(epoch)),
        }
        row["precision"] = rank.compute.precision
        history.append(row)
        checkpoint_and_report(rank, epoch, history, scores)
        beacon.val_mean_iou = row["val_mean_iou"]
        beacon.post(_status(rank, epoch, steps, loss, beacon))
        if rank.rank == 0:
            val = (
                f", val pixel acc {row['val_pixel_acc']:.3f}, mean IoU {row['val_mean_iou']:.3f}"
                if row["val_mean_iou"] is not None
                else ""
            )
            print(
                f"epoch {epoch + 1}/{config.optim.epochs}: train loss {row['train_loss']:.4f}"
                f"{val}, lr {row['lr']:.2e}, {row['images_per_s']:.1f} img/s",
                flush=True,
            )


@dataclass
class _Rank:
    """This rank's model, optimizer, data and settings, built once per worker-group start."""

    plan: Plan
    rank: int
    device: torch.device
    model: torch.nn.Module
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    compute_plan: ComputePlan
    scaler: Any
    class_weight: torch.Tensor | None
    augment: Callable[..., Any]
    to_input: Callable[..., Any]
    train_shard: Any
    val_shard: Any | None

    @property
    def compute(self) -> Compute:
        """Precision and memory layout of this run's forward passes."""
        return self.compute_plan.compute

    @classmethod
    def start(cls, plan: Plan) -> _Rank:
        """Set threads and seeds, build the model (DDP-wrapped) and its optimizer."""
        import ray.train
        import ray.train.torch

        config = plan.config
        torch.set_num_threads(plan.sizing.threads)
        device = ray.train.torch.get_device()
        # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
        torch.manual_seed(config.optim.seed)
        model = _initial_model(plan)
        optimizer = build_optimizer(
            model,
            config.optim.optimizer,
            lr=config.optim.lr,
            momentum=config.optim.momentum,
            weight_decay=config.optim.weight_decay,
        )
        scheduler = build_scheduler(
            optimizer,
            total_steps=plan.total_steps,
            warmup_steps=config.optim.warmup_steps,
            schedule=config.optim.schedule,
        )
        compute_plan = _compute_plan(plan, model, device)
        compute_plan.compute.model(model)  # in place
        # DDP: parameters are broadcast from rank 0 here, and each backward pass all-reduces
        # (averages) the gradients, so every rank steps identically.
        ddp_model = ray.train.torch.prepare_model(model)
        if compute_plan.compile:
            ddp_model = torch.compile(ddp_model, dynamic=True)  # type: ignore[assignment]
        weight = plan.class_weight
        return cls(
            plan=plan,
            rank=ray.train.get_context().get_world_rank(),
            device=device,
            model=model,
            ddp_model=ddp_model,
            optimizer=optimizer,
            scheduler=scheduler,
            compute_plan=compute_plan,
            # fp16 needs loss scaling (small gradients underflow); bf16 has fp32's range.
            scaler=torch.amp.GradScaler(device.type) if compute_plan.precision == "fp16" else None,
            class_weight=None if weight is None else torch.tensor(weight, device=device),
            augment=train_transform(
                config.data.crop_size,
                scale_range=config.data.scale_range,
                hflip_prob=0.5 if config.data.hflip else 0.0,
                normalization=config.model.normalization,
            ),
            to_input=eval_transform(normalization=config.model.normalization),
            train_shard=ray.train.get_dataset_shard("train"),
            val_shard=ray.train.get_dataset_shard("val") if plan.has_val else None,
        )


def _compute_plan(plan: Plan, model: torch.nn.Module, device: torch.device) -> ComputePlan:
    """Rank 0 resolves the precision policy (probing forward and backward at the run's crop and
    batch size where ``auto`` asks), then every rank takes its answer: all ranks run alike.
    """
    import torch.distributed as dist

    config = plan.config
    chosen: list[ComputePlan | None] = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        crop = config.data.crop_size
        batch = config.optim.batch_size
        probe = training_probe(model, (crop, crop), batch, plan.num_classes)
        key = f"train {config.model.name} {batch}x{crop}x{crop}"
        resolved = resolve(config.compute, device, probe=probe, key=key)
        tell(f"run {plan.run_id}: compute {resolved.describe()}")
        chosen[0] = resolved
    if dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    assert chosen[0] is not None
    return chosen[0]


def train_one_epoch(rank: _Rank, epoch: int, beacon: Beacon | None = None) -> dict[str, float]:
    """One pass over this rank's shard; the epoch's loss, last lr and images/s (all ranks).

    Rank 0 posts its step and running loss to ``beacon`` about once a second.
    """
    plan, config = rank.plan, rank.plan.config
    rank.ddp_model.train()
    began = time.perf_counter()
    loss_sum = torch.zeros((), device=rank.device)
    batches = images_seen = 0
    lr = rank.optimizer.param_groups[0]["lr"]  # the last step's, reported per epoch
    rank.optimizer.zero_grad(set_to_none=True)
    shuffle_buffer = None
    if config.data.shuffle == "blocks":
        # "blocks" only reorders whole blocks: mix rows across a few of them too, so a
        # batch is not the same rows every epoch.
        shuffle_buffer = _LOCAL_SHUFFLE_BATCHES * config.optim.batch_size
    batches_iter = iter_train_batches(
        rank.train_shard,
        transform=rank.augment,
        batch_size=config.optim.batch_size,
        local_shuffle_buffer_size=shuffle_buffer,
        device=rank.device,
    )
    accum = config.optim.grad_accum
    for index, (batch, last) in enumerate(_with_last(batches_iter)):
        if plan.faults is not None:
            plan.faults.train_fault(plan.checkpoint_root, rank.rank, epoch, index)
        step_now = last or (index + 1) % accum == 0
        # Accumulating: skip DDP's gradient all-reduce on all but the micro-batch that
        # steps. Every rank sees the same number of batches (Ray splits the train set
        # with equal=True), so all ranks reach each synchronising backward together.
        sync: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if not step_now and isinstance(rank.ddp_model, DistributedDataParallel):
            sync = rank.ddp_model.no_sync()
        with sync:
            loss_sum += forward_backward(
                rank.ddp_model,
                batch.images,
                batch.masks,
                # Mean over the batches of this step's group (the last may be short).
                loss_scale=1.0 / _group_size(index, accum, plan.batches_per_epoch),
                class_weight=rank.class_weight,
                compute=rank.compute,
                scaler=rank.scaler,
            )
        if step_now:
            lr = rank.optimizer.param_groups[0]["lr"]
            if rank.scaler is not None:
                rank.scaler.step(rank.optimizer)
                rank.scaler.update()
            else:
                rank.optimizer.step()
            rank.scheduler.step()
            rank.optimizer.zero_grad(set_to_none=True)
        batches += 1
        images_seen += len(batch.image_ids)
        if beacon is not None and beacon.due():
            # Reading the loss waits for the device: only when a post goes (once a second).
            beacon.post(_status(rank, epoch, batches, float(loss_sum) / batches, beacon))
    elapsed = time.perf_counter() - began
    # One all-reduce per epoch (not per step: reading a loss syncs the device).
    totals = torch.tensor(
        [float(loss_sum), batches, images_seen], dtype=torch.float64, device=rank.device
    )
    _all_reduce(totals)
    return {
        "train_loss": float(totals[0] / max(1.0, float(totals[1]))),
        "lr": float(lr),
        "images_per_s": float(totals[2]) / elapsed if elapsed > 0 else 0.0,
    }


def _status(
    rank: _Rank, epoch: int, step: int, loss: float, beacon: Beacon, *, validating: bool = False
) -> TrainStatus:
    return TrainStatus(
        epoch=epoch,
        step=step,
        steps=rank.plan.batches_per_epoch,
        loss=loss,
        val_mean_iou=beacon.val_mean_iou,
        validating=validating,
    )


def validate(rank: _Rank) -> dict[str, Any]:
    """The paper's metrics over the whole val split (every rank gets the same); {} without."""
    if rank.val_shard is None:
        return {}
    samples = (
        rank.to_input(s.image, s.mask if s.mask is not None else _no_mask(s.image_uri))
        for s in iter_samples(rank.val_shard)
    )
    # Each rank scores its share of the val images; the sum of the matrices is the matrix of
    # the whole split, so every rank computes the same metrics. DDP broadcasts rank 0's
    # buffers at each forward, but the last one updated each rank's BatchNorm statistics
    # from its own batch: score with rank 0's, the ones the checkpoint keeps.
    _broadcast_buffers(rank.model)
    confusion = evaluate(
        rank.model, samples, rank.plan.num_classes, device=rank.device, compute=rank.compute
    ).reduce()
    scores = confusion.scores()
    scores["confusion"] = confusion.matrix.cpu()
    return scores


def checkpoint_and_report(
    rank: _Rank, epoch: int, history: list[dict[str, Any]], scores: dict[str, Any]
) -> None:
    """Upload this rank's part of the epoch's checkpoint and report the epoch's metrics."""
    import ray.train
    from ray.train import Checkpoint

    row = history[-1]
    metrics = {
        **{k: v for k, v in row.items() if k != "checkpoint_uri"},
        # NaN sorts oddly: an undefined mean IoU scores below every defined one.
        "val_mean_iou_score": row["val_mean_iou"] if row["val_mean_iou"] is not None else -1.0,
    }
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(_rng_state(), Path(tmp) / f"rng_rank{rank.rank}.pt")
        if rank.rank == 0:
            torch.save(
                {
                    "model": rank.model.state_dict(),
                    "optimizer": rank.optimizer.state_dict(),
                    "scheduler": rank.scheduler.state_dict(),
                    "epoch": epoch,
                    "history": history,
                    "scores": _plain_scores(scores),
                    "compute": rank.compute_plan.record(),
                },
                Path(tmp) / _STATE_FILE,
            )
        # A barrier: every rank uploads its part to the same directory, and Ray Train
        # registers the checkpoint once all have, so a torn upload is never restored.
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(tmp),
            checkpoint_dir_name=_checkpoint_name(epoch),
        )


def _checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def _group_size(index: int, accum: int, batches: int) -> int:
    """Batches in the accumulation group of batch ``index`` (the last group may be short)."""
    start = index - index % accum
    return max(1, min(accum, batches - start))


def restore(
    directory: Path,
    plan: Plan,
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
        tell(f"run {plan.run_id}: resumed after epoch {start_epoch}")
    return start_epoch, list(state["history"])


def was_resumed(checkpoint_root: str, options: StorageOptions | None = None) -> bool:
    """Whether any attempt of the run under ``checkpoint_root`` restored a checkpoint."""
    return storage.exists(storage.join(checkpoint_root, _RESUMED_MARKER), options)


def _initial_model(plan: Plan) -> FCN:
    """The model before training: fresh, plus backbone weights or a coarser FCN."""
    config = plan.config
    model = build_model(config.model.name, plan.num_classes, **config.model.options)
    if config.model.backbone_weights is not None:
        data = storage.read_bytes(config.model.backbone_weights, plan.storage, max_bytes=2**31)
        import io

        report = load_backbone_weights(model, io.BytesIO(data))
        logger.info("backbone weights: %d tensors loaded", len(report.loaded))
    if config.model.init_from is not None:
        source, _ = load_artifact(config.model.init_from, options=plan.storage)
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


def read_checkpoint(checkpoint: Any) -> dict[str, Any]:
    """The state rank 0 saved in a checkpoint (``ray.train.Checkpoint``) of this module."""
    with checkpoint.as_directory() as directory:
        state: dict[str, Any] = torch.load(
            Path(directory) / _STATE_FILE, map_location="cpu", weights_only=True
        )
    return state
