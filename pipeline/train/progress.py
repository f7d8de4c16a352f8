"""Training progress: rank 0 posts its step to the run's progress board; the driver shows it.

Rank 0 posts a :class:`TrainStatus` (epoch, step, running loss, the last val mean IoU) at most
once a second and at each epoch's end (:class:`Beacon`), without waiting; the decode tasks
count their objects on the same board. The driver polls the board and turns what it finds
into the ``decoding`` and ``training`` stages of :mod:`pipeline.progress` (:class:`TrainView`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from pipeline.progress import ProgressSink, Snapshot, Tracker

__all__ = ["Beacon", "TrainStatus", "TrainView"]


@dataclass(frozen=True)
class TrainStatus:
    """Where training is, as rank 0 sees it."""

    epoch: int
    """The epoch under way (0-based)."""
    step: int
    """Batches of this rank done in the epoch."""
    steps: int
    """Batches per epoch of each rank."""
    loss: float | None
    """Rank 0's mean train loss of the epoch so far."""
    val_mean_iou: float | None
    """Val mean IoU of the last epoch validated (None: none yet, or no val split)."""
    validating: bool = False
    """The epoch's batches are done; the ranks score the val split."""


class Beacon:
    """Rank 0's side: posts a status to the board at most every ``every_s`` seconds.

    Args:
        board: The board actor's handle (``pipeline.progress.Board.handle``); None posts
            nothing (other ranks, or no board).
        every_s: Least seconds between two posts (a post is one fire-and-forget actor call).
    """

    def __init__(self, board: Any, every_s: float = 1.0) -> None:
        self.board = board
        self.every_s = every_s
        self._last = -float("inf")
        self.val_mean_iou: float | None = None

    def due(self) -> bool:
        """Whether a post would go now (so the caller computes the status only then: the
        loss is a device tensor, and reading it waits for the device)."""
        return self.board is not None and time.monotonic() - self._last >= self.every_s

    def post(self, status: TrainStatus) -> None:
        """Post ``status`` now."""
        if self.board is None:
            return
        self._last = time.monotonic()
        try:
            self.board.post.remote(status)
        except Exception:  # progress never fails a run
            self.board = None


class TrainView:
    """The driver's side: the run's ``decoding`` and ``training`` stages from board snapshots.

    :meth:`show` runs in the board's polling thread, the other methods in the driver's: a
    lock keeps the stages consistent.

    Args:
        sink: Where the stages' updates go.
        images: Images to decode (train and val).
        epochs: Epochs of the run.
        run_id: Makes the stages' keys.
    """

    def __init__(self, sink: ProgressSink, *, images: int, epochs: int, run_id: str) -> None:
        self.epochs = epochs
        self.steps = 1
        self.decoding = Tracker(
            "decoding", images, sink, unit="images", rate_unit="img/s", key=f"{run_id}/decode"
        )
        self.training: Tracker | None = None
        self._sink = sink
        self._run_id = run_id
        self._lock = threading.Lock()

    def show(self, snapshot: Snapshot) -> None:
        """Update the stages from what the board holds."""
        with self._lock:
            if not self.decoding.finished:
                if snapshot.objects:
                    self.decoding.set(snapshot.objects, errors=snapshot.errors)
                return
            status = snapshot.status
            if self.training is None or self.training.finished:
                return
            if not isinstance(status, TrainStatus):
                return
            epoch = min(status.epoch, self.epochs - 1)
            done = epoch * self.steps + min(status.step, self.steps)
            where = "validating" if status.validating else f"step {status.step}/{self.steps}"
            parts = [f"epoch {epoch + 1}/{self.epochs}", where]
            if status.loss is not None:
                parts.append(f"loss {status.loss:.4f}")
            if status.val_mean_iou is not None:
                parts.append(f"val mean IoU {status.val_mean_iou:.3f}")
            self.training.set(done, detail=", ".join(parts))

    def decoded(self, *, train: int, val: int, errors: int) -> None:
        """Decoding is over: the exact counts, from the datasets."""
        with self._lock:
            self.decoding.set(train + val + errors, errors=errors)
            self.decoding.finish(detail=f"{train} train + {val} val")

    def start_training(self, *, steps: int, images_per_step: int) -> None:
        """The ranks start: ``steps`` batches per epoch each, ``images_per_step`` in all."""
        with self._lock:
            self.steps = max(1, steps)
            self.training = Tracker(
                "training",
                self.epochs * self.steps,
                self._sink,
                unit="steps",
                rate_unit="img/s",
                rate_scale=images_per_step,
                count=False,
                key=f"{self._run_id}/train",
            )
            self.training.set(0, detail=f"epoch 1/{self.epochs}, starting the workers")

    def trained(self, history: list[dict[str, Any]]) -> None:
        """Training is over: its last line from the run's history."""
        with self._lock:
            if self.training is None:
                return
            last = history[-1] if history else {}
            parts = [f"epoch {len(history)}/{self.epochs}"]
            if last.get("train_loss") is not None:
                parts.append(f"loss {last['train_loss']:.4f}")
            if last.get("val_mean_iou") is not None:
                parts.append(f"val mean IoU {last['val_mean_iou']:.3f}")
            self.training.set(self.training.total, detail=", ".join(parts))
            self.training.finish()
