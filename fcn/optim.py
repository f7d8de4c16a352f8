"""Optimizers and learning-rate schedules for FCN training.

The paper trains with SGD, momentum 0.9 (0.99 with its unnormalised loss), weight decay
5^-4 and a fixed learning rate; later FCN work (and torchvision's reference) uses a "poly"
decay. Biases and normalisation parameters get no weight decay: decaying them only pulls
activations' offsets and scales towards zero.

Usage::

    optimizer = build_optimizer(model, "sgd", lr=1e-3, momentum=0.9, weight_decay=5e-4)
    scheduler = build_scheduler(optimizer, total_steps=1000, warmup_steps=50, schedule="poly")
    ...
    optimizer.step()
    scheduler.step()  # once per optimizer step
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fcn.names import OPTIMIZERS, SCHEDULES, OptimizerName, Schedule

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "OptimizerName",
    "Schedule",
    "build_optimizer",
    "build_scheduler",
    "lr_factor",
    "param_groups",
]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Trainable parameters in two groups: weights with decay, biases and norms without.

    A parameter with one dimension or none (a bias, a BatchNorm/LayerNorm scale or shift)
    gets no decay. Frozen parameters (e.g. fixed bilinear upsamplers) are left out.

    Args:
        model: The network (a DDP wrapper is fine: its parameters are the module's).
        weight_decay: Decay of the first group.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    name: OptimizerName,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's) or AdamW, with :func:`param_groups`.

    Args:
        model: The network.
        name: ``"sgd"`` or ``"adamw"``.
        lr: Base learning rate.
        momentum: SGD momentum; AdamW's beta1.
        weight_decay: Decay of weights (not of biases and norms).
    """
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def lr_factor(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: Schedule = "poly",
    power: float = 0.9,
) -> float:
    """The multiplier of the base learning rate before optimizer step ``step`` (0-based).

    A linear warmup from ``1 / (warmup_steps + 1)`` up to 1 over the first ``warmup_steps``
    steps, then ``"poly"``: ``(1 - t)^power``, ``"cosine"``: ``(1 + cos(pi t)) / 2`` or
    ``"constant"``: 1, where t goes from 0 to 1 over the remaining steps. Steps past
    ``total_steps`` keep the last value (a resumed run may take a step or two more).

    Args:
        step: Optimizer steps taken so far.
        total_steps: Steps of the whole run.
        warmup_steps: Steps of linear warmup (counted in ``total_steps``).
        schedule: ``"poly"``, ``"cosine"`` or ``"constant"``.
        power: Exponent of ``"poly"``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "poly":
        return (1.0 - t) ** power
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: Schedule = "poly",
    power: float = 0.9,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` following :func:`lr_factor`; call ``step()`` after each update.

    Its ``state_dict()`` holds the step count and the factor's settings (plain numbers and
    a string), so it checkpoints with ``torch.save`` and loads with ``weights_only=True``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(
            f"need total_steps >= 1 and warmup_steps >= 0: {total_steps}, {warmup_steps}"
        )
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        _Factor(total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule, power=power),
    )


class _Factor:
    """A picklable :func:`lr_factor` with its settings bound (LambdaLR saves no callables)."""

    def __init__(self, *, total_steps: int, warmup_steps: int, schedule: Schedule, power: float):
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.schedule: Schedule = schedule
        self.power = power

    def __call__(self, step: int) -> float:
        return lr_factor(
            step,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            schedule=self.schedule,
            power=self.power,
        )
