"""Resuming and the test hooks, without Ray: what the recovery tests rely on.

- ``TrainResult.resumed`` comes from a marker that any attempt restoring a checkpoint writes,
  including an attempt that finds every epoch already done (and so writes no checkpoint);
- the fault hooks fire once, stall until released, and read Ray Train's registration.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from fcn.models import build_model
from fcn.optim import build_optimizer, build_scheduler
from pipeline.config import make
from pipeline.faults import Faults, registered_epoch, wait_registered
from pipeline.plan import TrainPlan
from pipeline.storage import StorageOptions
from pipeline.train.config import TrainConfig
from pipeline.train.worker import Plan, restore, was_resumed

pytestmark = pytest.mark.unit

SIZING = TrainPlan(
    num_workers=1, use_gpu=False, cpus_per_worker=1, threads=1, placement_strategy="PACK", nodes=1
)


def _plan(root: Path, epochs: int) -> Plan:
    config = make(
        TrainConfig, dataset_uri=str(root / "data"), output_uri=str(root / "out"), epochs=epochs
    )
    return Plan(
        config=config,
        run_id="r",
        num_classes=3,
        class_names=("a", "b", "c"),
        batches_per_epoch=1,
        total_steps=epochs,
        has_val=False,
        checkpoint_root=str(root / "out" / "checkpoints" / "r"),
        class_weight=None,
        storage=StorageOptions(),
        sizing=SIZING,
    )


def _parts(epochs: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    model = build_model("fcn32s_resnet18", 3)
    optimizer = build_optimizer(model, "sgd", lr=0.1, momentum=0.9, weight_decay=0.0)
    return model, optimizer, build_scheduler(optimizer, total_steps=epochs, schedule="poly")


def test_restoring_the_last_epoch_still_marks_the_run_resumed(tmp_path: Path) -> None:
    epochs = 2
    plan = _plan(tmp_path, epochs)
    model, optimizer, scheduler = _parts(epochs)
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1)} for e in range(epochs)]
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),  # type: ignore[attr-defined]
            "epoch": epochs - 1,  # every epoch is done: this attempt trains nothing
            "history": history,
            "scores": {},
        },
        checkpoint / "state.pt",
    )
    assert not was_resumed(plan.checkpoint_root)

    fresh, fresh_optimizer, fresh_scheduler = _parts(epochs)
    start, restored = restore(checkpoint, plan, 0, fresh, fresh_optimizer, fresh_scheduler)

    assert start == epochs and restored == history
    assert was_resumed(plan.checkpoint_root)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_other_ranks_restore_without_marking(tmp_path: Path) -> None:
    plan = _plan(tmp_path, 1)
    model, optimizer, scheduler = _parts(1)
    (tmp_path / "ckpt").mkdir()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),  # type: ignore[attr-defined]
            "epoch": 0,
            "history": [],
        },
        tmp_path / "ckpt" / "state.pt",
    )
    restore(tmp_path / "ckpt", plan, 1, model, optimizer, scheduler)
    assert not was_resumed(plan.checkpoint_root)  # rank 0 speaks for the run


def test_a_fault_fires_once_per_root(tmp_path: Path) -> None:
    faults = Faults(root=str(tmp_path / "f"))
    assert faults.fire_once()
    assert not faults.fire_once()
    assert Faults(root=str(tmp_path / "f")).fire_once() is False  # another process, same root
    assert Faults(root=str(tmp_path / "g")).fire_once()


def test_a_stall_says_who_and_waits_for_release(tmp_path: Path) -> None:
    faults = Faults(root=str(tmp_path / "f"), actor_stall_after=0)
    stalled = threading.Thread(target=faults.stall, args=("actor-1",), kwargs={"node_id": "n1"})
    stalled.start()
    while not faults.stalled():
        assert stalled.is_alive()
        stalled.join(0.05)
    assert faults.stalled()["actor-1"]["node_id"] == "n1"
    assert stalled.is_alive(), "a stall lasts until released"
    faults.release()
    stalled.join(10)
    assert not stalled.is_alive()
    faults.stall("actor-2")  # after the release no stall starts
    assert set(faults.stalled()) == {"actor-1"}


def test_the_training_fault_waits_for_ray_trains_registration(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    assert registered_epoch(str(root), StorageOptions()) is None

    def register(epoch: int) -> None:
        snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": f"epoch_{epoch:04d}"}}
        (root / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))

    register(0)
    assert registered_epoch(str(root), StorageOptions()) == 0
    waiting = threading.Thread(target=wait_registered, args=(str(root), 1, StorageOptions()))
    waiting.start()
    waiting.join(1.0)
    assert waiting.is_alive(), "epoch 1 is not registered yet"
    register(1)
    waiting.join(10)
    assert not waiting.is_alive()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0:1:2", ((0, 1, 2), False)), ("1:0:0:stall", ((1, 0, 0), True))],
)
def test_train_fault_spec(text: str, expected: tuple[tuple[int, int, int], bool]) -> None:
    assert Faults.parse_train_at(text) == expected


@pytest.mark.parametrize("text", ["0:1", "a:b:c", "0:1:2:stop", "0:1:2:stall:x"])
def test_bad_train_fault_spec(text: str) -> None:
    with pytest.raises(ValueError, match="RANK:EPOCH:STEP"):
        Faults.parse_train_at(text)
