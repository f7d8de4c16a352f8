"""Test hooks: make a job fail or stall at a chosen point, so that recovery tests need no race.

A recovery test kills something (a node, the driver, the S3 server) while a job runs. Timing
the kill by a fixed sleep races the work: on a fast machine the job is done before the kill,
on a slow one it has not started. These hooks make the job itself wait at a chosen point and
say so with a marker object, so the test kills exactly there:

- ``train_at`` (rank, epoch, step): that rank, before that batch, waits until the previous
  epoch's checkpoint is registered by Ray Train, then exits abruptly or stalls;
- ``actor_stall_after``: each inference actor, after that many batches, stalls;
- ``driver_exit_after``: the segmentation driver exits abruptly once that many predictions
  are in files.

A stall writes ``<root>/stalled/<who>`` and waits until ``<root>/release`` exists (the test
writes it after its kill) or the process is killed. Each hook fires once per ``root``: a
restarted worker group or a replacement actor goes through.

Faults are never part of a job's configuration (nor of a flow's parameters): the hidden CLI
options build them and the job functions take them as a separate argument.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.errors import ConfigError
from pipeline.storage import StorageOptions

__all__ = ["Faults"]

_POLL_S = 0.5
_STALL_LIMIT_S = 900.0
"""A stall nobody ends exits after this long: a hung test then fails instead of hanging."""
_REGISTER_LIMIT_S = 120.0


@dataclass(frozen=True, kw_only=True)
class Faults:
    """Where the markers go and which hooks are armed (see the module docstring)."""

    root: str
    """Directory (URI) of the markers: ``fired``, ``stalled/<who>``, ``release``."""
    storage: StorageOptions = field(default_factory=StorageOptions)
    """How to reach ``root``."""
    train_at: tuple[int, int, int] | None = None
    """(rank, epoch, step): the training rank that fails, before that batch of that epoch."""
    train_stall: bool = False
    """The training fault stalls (until released or killed) instead of exiting."""
    actor_stall_after: int | None = None
    """Each inference actor stalls before its batch number N + 1 (once; until released)."""
    driver_exit_after: int | None = None
    """The segmentation driver exits once this many predictions are in files."""
    strips_exit_after: int | None = None
    """The segmentation driver exits once this many strips of tiled images are back."""

    def __post_init__(self) -> None:
        if self.train_at is not None and min(self.train_at) < 0:
            raise ConfigError(f"train_at needs rank, epoch and step >= 0: {self.train_at}")
        for name in ("actor_stall_after", "driver_exit_after", "strips_exit_after"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")

    @staticmethod
    def parse_train_at(text: str) -> tuple[tuple[int, int, int], bool]:
        """``"RANK:EPOCH:STEP"`` (exit) or ``"RANK:EPOCH:STEP:stall"``."""
        parts = text.split(":")
        stall = len(parts) == 4 and parts[3] == "stall"
        try:
            rank, epoch, step = (int(p) for p in parts[:3])
            if len(parts) not in (3, 4) or (len(parts) == 4 and not stall):
                raise ConfigError("")
        except ValueError:
            raise ConfigError(f"expected RANK:EPOCH:STEP[:stall], got {text!r}") from None
        return (rank, epoch, step), stall

    def _marker(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def fire_once(self) -> bool:
        """True the first time it is called under ``root`` (in any process), then False."""
        marker = self._marker("fired")
        if storage.exists(marker, self.storage):
            return False
        storage.write_bytes(marker, b"", self.storage)
        return True

    def released(self) -> bool:
        """Whether the test has written ``release``."""
        return storage.exists(self._marker("release"), self.storage)

    def release(self) -> None:
        """End every stall under ``root``, and let no later one start."""
        storage.write_bytes(self._marker("release"), b"", self.storage)

    def stalled(self) -> dict[str, dict[str, object]]:
        """Who is stalled (or was): ``who`` -> what it wrote (pid, node id, ...)."""
        found = storage.list_files(self._marker("stalled"), options=self.storage)
        return {
            info.relpath: json.loads(storage.read_bytes(info.uri, self.storage)) for info in found
        }

    def stall(self, who: str, **facts: object) -> None:
        """Say ``who`` is stalled here (with ``facts``), then wait for ``release``."""
        if self.released():
            return
        body = json.dumps({"pid": os.getpid(), **facts}).encode()
        storage.write_bytes(self._marker("stalled", who), body, self.storage)
        print(f"fault injection: {who} stalls until released", flush=True)
        deadline = time.monotonic() + _STALL_LIMIT_S
        while not self.released():
            if time.monotonic() > deadline:
                print(f"fault injection: {who} was never released; exiting", flush=True)
                os._exit(1)
            time.sleep(_POLL_S)

    def train_fault(self, checkpoint_root: str, rank: int, epoch: int, step: int) -> None:
        """The training hook, called by every rank before every batch."""
        if self.train_at != (rank, epoch, step) or not self.fire_once():
            return
        if epoch > 0:
            # Ray Train registers a reported checkpoint a moment after report() returns;
            # a worker that dies before that can lose it. Wait until it is registered.
            wait_registered(checkpoint_root, epoch - 1, self.storage)
        if self.train_stall:
            self.stall(f"rank{rank}", epoch=epoch, step=step)
            return
        print(f"fault injection: rank {rank} exits at epoch {epoch} step {step}", flush=True)
        os._exit(1)


def registered_epoch(checkpoint_root: str, options: StorageOptions) -> int | None:
    """The epoch of the latest checkpoint Ray Train has registered for a run, if any.

    Ray Train V2 keeps its checkpoint bookkeeping in ``checkpoint_manager_snapshot.json``
    beside the checkpoints (written after each registration); our checkpoint directories
    are named ``epoch_NNNN``.
    """
    snapshot = storage.join(checkpoint_root, "checkpoint_manager_snapshot.json")
    try:
        state = json.loads(storage.read_bytes(snapshot, options))
    except FileNotFoundError:
        return None
    latest = state.get("latest_checkpoint_result") or {}
    name = str(latest.get("checkpoint_dir_name") or "")
    return int(name.removeprefix("epoch_")) if name.startswith("epoch_") else None


def wait_registered(checkpoint_root: str, epoch: int, options: StorageOptions) -> None:
    """Wait until Ray Train has registered the checkpoint of ``epoch`` (or a later one)."""
    deadline = time.monotonic() + _REGISTER_LIMIT_S
    while True:
        latest = registered_epoch(checkpoint_root, options)
        if latest is not None and latest >= epoch:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{checkpoint_root}: epoch {epoch}'s checkpoint was not registered in "
                f"{_REGISTER_LIMIT_S:.0f} s"
            )
        time.sleep(_POLL_S)
