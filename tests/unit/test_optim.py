"""fcn.optim: decay groups, learning-rate schedules, and their checkpointing."""

from __future__ import annotations

import io
import math

import pytest
import torch

from fcn.models import build_model
from fcn.optim import build_optimizer, build_scheduler, lr_factor, param_groups

pytestmark = pytest.mark.unit


def test_no_decay_on_biases_and_norms_and_frozen_left_out() -> None:
    model = build_model("fcn8s_resnet18", 3)
    decay, no_decay = param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}  # type: ignore[attr-defined]
    undecayed = {id(p) for p in no_decay["params"]}  # type: ignore[attr-defined]
    named = dict(model.named_parameters())
    assert id(named["backbone.bn1.weight"]) in undecayed
    assert id(named["head.score_fr.bias"]) in undecayed
    assert id(named["head.score_fr.weight"]) in decayed
    # The last upsampler is fixed bilinear (the paper's): no optimizer may touch it.
    assert id(named["head.upscore8.weight"]) not in decayed | undecayed
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert decayed | undecayed == trainable and not decayed & undecayed


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizers_step(name: str) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model, name, lr=0.1)  # type: ignore[arg-type]
    before = model.weight.detach().clone()
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.weight)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer(model, "lamb", lr=0.1)  # type: ignore[arg-type]


def test_lr_factor_warmup_then_decay() -> None:
    total, warm = 110, 10
    warmup = [lr_factor(s, total_steps=total, warmup_steps=warm) for s in range(warm)]
    assert warmup == pytest.approx([(s + 1) / 11 for s in range(warm)])
    assert lr_factor(warm, total_steps=total, warmup_steps=warm) == 1.0
    mid = lr_factor(warm + 50, total_steps=total, warmup_steps=warm)
    assert mid == pytest.approx(0.5**0.9)
    assert lr_factor(total, total_steps=total, warmup_steps=warm) == 0.0
    assert lr_factor(total + 5, total_steps=total, warmup_steps=warm) == 0.0  # clamped
    cos = lr_factor(50, total_steps=100, schedule="cosine")
    assert cos == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(99, total_steps=100, schedule="constant") == 1.0
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_factor(0, total_steps=10, schedule="step")  # type: ignore[arg-type]


def test_scheduler_round_trips_through_a_weights_only_checkpoint() -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, "sgd", lr=1.0)
    scheduler = build_scheduler(optimizer, total_steps=20, warmup_steps=2, schedule="poly")
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"scheduler": scheduler.state_dict(), "opt": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    optimizer2 = build_optimizer(model, "sgd", lr=1.0)
    scheduler2 = build_scheduler(optimizer2, total_steps=20, warmup_steps=2, schedule="poly")
    optimizer2.load_state_dict(state["opt"])
    scheduler2.load_state_dict(state["scheduler"])
    optimizer.step()
    scheduler.step()
    optimizer2.step()
    scheduler2.step()
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(
        lr_factor(8, total_steps=20, warmup_steps=2)
    )
