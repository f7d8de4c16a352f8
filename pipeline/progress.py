"""Progress of the long stages (decoding, training, segmentation), for people and for the UI.

A job measures its progress with a :class:`Tracker` per stage (done out of total, errors,
rate, ETA) and hands each change to a :class:`ProgressSink`: live bars on a terminal
(:class:`RichBars`), a plain line now and then where the output is a file or a log
(:class:`PlainLines`), or anything else with an ``update`` method (the Prefect flows add a
progress artifact, ``flows.progress``). What a sink gets is an :class:`Update`: a stage name,
a fraction and one line of text, so a line printed by a Ray Job (``ray job logs``) parses back
into the same update on the side that follows the job (:func:`parse_line`).

Progress that happens inside Ray workers (a decode task's objects, rank 0's training steps)
reaches the driver through a :class:`Board`: a small actor the workers post to without
waiting and the driver polls once a second (:meth:`Board.follow`). Nothing here imports
Prefect, rich (until a bar is drawn) or torch.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "STAGES",
    "Board",
    "Fanout",
    "PlainLines",
    "ProgressSink",
    "RichBars",
    "Snapshot",
    "Tracker",
    "Update",
    "format_duration",
    "parse_line",
]

logger = logging.getLogger(__name__)

STAGES = ("decoding", "training", "segmenting")
"""The stage names a progress line can carry (what :func:`parse_line` recognises)."""

_LINE = re.compile(rf"^(?P<stage>{'|'.join(STAGES)}): +(?P<percent>\d{{1,3}})% (?P<text>.*)$")


@dataclass(frozen=True)
class Update:
    """One stage's progress at a moment: what every sink renders."""

    key: str
    """Tells apart two stages of the same name (two runs in one process)."""
    stage: str
    """What is progressing: one of :data:`STAGES`."""
    fraction: float
    """Done, from 0 to 1."""
    text: str
    """The rest of the line: counts, errors, metrics, rate, ETA (or the time it took)."""
    finished: bool = False
    """The stage is over (the last update of ``key``)."""

    @property
    def percent(self) -> int:
        """Whole percent done, rounded down (100 only once finished or complete)."""
        return 100 if self.finished else min(100, math.floor(self.fraction * 100))

    def line(self) -> str:
        """The plain line, e.g. ``segmenting:  80% 80/100 images, 0 errors, ETA 2s``."""
        return f"{self.stage}: {self.percent:3d}% {self.text}"


def parse_line(line: str, key: str = "") -> Update | None:
    """The update a plain progress line (:meth:`Update.line`) carries; None for other lines.

    Args:
        line: A line of output (e.g. of a Ray Job's log).
        key: Prefix of the update's key (e.g. the job's id): the stage name is appended.
    """
    match = _LINE.match(line.strip())
    if match is None:
        return None
    percent = min(100, int(match["percent"]))
    text = match["text"]
    return Update(
        key=f"{key}/{match['stage']}",
        stage=match["stage"],
        fraction=percent / 100,
        text=text,
        # A finished stage says how long it took instead of an ETA.
        finished=percent == 100 and "ETA" not in text,
    )


def format_duration(seconds: float) -> str:
    """``42s``, ``3m10s``, ``2h05m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressSink(Protocol):
    """Something that shows progress: gets every update of every stage, in order per stage."""

    def update(self, update: Update) -> None:
        """Show ``update`` (a sink throttles itself; it never raises for display reasons)."""


class Tracker:
    """One stage of one run: counts, rate and ETA, handed to a sink as :class:`Update` s.

    The rate (and so the ETA) is measured from the first unit done, so start-up time (Ray
    starting workers, actors loading the model) does not count against it.

    Args:
        stage: One of :data:`STAGES`.
        total: Units the stage has to do.
        sink: Where the updates go.
        unit: What a unit is, as printed after the counts (``images``).
        rate_unit: How the rate is printed (``img/s``); None: no rate.
        rate_scale: Rate units per unit (images per training step).
        count: Print ``done/total unit`` first (training prints epochs and steps instead).
        key: Unique key of this stage (default: made up).
    """

    _serial = 0

    def __init__(
        self,
        stage: str,
        total: int,
        sink: ProgressSink,
        *,
        unit: str,
        rate_unit: str | None = None,
        rate_scale: float = 1.0,
        count: bool = True,
        key: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        Tracker._serial += 1
        self.stage = stage
        self.total = max(0, total)
        self.sink = sink
        self.unit = unit
        self.rate_unit = rate_unit
        self.rate_scale = rate_scale
        self.count = count
        self.key = key or f"{stage}-{Tracker._serial}"
        self.clock = clock
        self.done = 0
        self.errors: int | None = None
        self.detail = ""
        self.finished = False
        self._started = clock()
        self._first: tuple[float, int] | None = None  # (time, done) when units first came

    def set(self, done: int, *, errors: int | None = None, detail: str | None = None) -> None:
        """Set the units done so far (and the errors, and text that goes before the rate)."""
        if self.finished:
            return
        done = min(max(0, done), self.total) if self.total else max(0, done)
        if self._first is None and done > 0:
            # The rate is measured from here: the units of the first report took start-up
            # time too (workers starting, the model loading).
            self._first = (self.clock(), done)
        self.done = done
        if errors is not None:
            self.errors = errors
        if detail is not None:
            self.detail = detail
        self._emit()

    def advance(self, units: int, *, errors: int = 0) -> None:
        """Add ``units`` done, ``errors`` of which failed."""
        self.set(self.done + units, errors=(self.errors or 0) + errors)

    def finish(self, *, detail: str | None = None) -> None:
        """The stage is over: one last update, with the time it took instead of an ETA."""
        if self.finished:
            return
        if detail is not None:
            self.detail = detail
        self.finished = True
        self._emit()

    def rate(self) -> float | None:
        """Units per second since the first unit came; None before."""
        if self._first is None:
            return None
        since, base = self._first
        seconds = self.clock() - since
        if seconds <= 0 or self.done <= base:
            return None
        return (self.done - base) / seconds

    def _emit(self) -> None:
        parts = []
        if self.count:
            parts.append(f"{self.done}/{self.total} {self.unit}")
        if self.detail:
            parts.append(self.detail)
        if self.errors is not None:
            parts.append(f"{self.errors} error{'' if self.errors == 1 else 's'}")
        rate = self.rate()
        if rate is not None and self.rate_unit:
            parts.append(f"{rate * self.rate_scale:.1f} {self.rate_unit}")
        if self.finished:
            parts.append(f"took {format_duration(self.clock() - self._started)}")
        elif rate is not None and self.total:
            parts.append(f"ETA {format_duration((self.total - self.done) / rate)}")
        fraction = self.done / self.total if self.total else float(self.finished)
        update = Update(self.key, self.stage, fraction, ", ".join(parts), self.finished)
        try:
            self.sink.update(update)
        except Exception:  # progress never fails a job
            logger.warning("progress display failed", exc_info=True)


class PlainLines:
    """Progress as plain lines, for output that is not a terminal: sparse, never a flood.

    A line when a stage has moved at least ``step`` since the last one and ``every_s``
    seconds have passed, or after ``heartbeat_s`` seconds with no line; always the stage's
    last line. ``step=0`` prints every ``every_s`` seconds (a log, e.g. a Ray Job's).

    Args:
        echo: Where lines go.
        every_s: Least seconds between two lines of a stage.
        step: Least progress (fraction) between two lines of a stage.
        heartbeat_s: Most seconds between two lines of a stage.
    """

    def __init__(
        self,
        echo: Callable[[str], None],
        *,
        every_s: float = 10.0,
        step: float = 0.1,
        heartbeat_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.echo = echo
        self.every_s = every_s
        self.step = step
        self.heartbeat_s = heartbeat_s
        self.clock = clock
        self._last: dict[str, tuple[float, float]] = {}  # key -> (time, fraction) of its line
        self._done: set[str] = set()
        self._lock = threading.Lock()

    def update(self, update: Update) -> None:
        """Print ``update`` if it is due (see the class docstring)."""
        now = self.clock()
        with self._lock:
            if update.key in self._done:
                return
            if update.finished:
                self._done.add(update.key)
                self._last.pop(update.key, None)
            else:
                when, fraction = self._last.setdefault(update.key, (now, 0.0))
                waited = now - when
                moved = update.fraction - fraction
                if not (
                    (waited >= self.every_s and moved >= self.step and moved > 0)
                    or (waited >= self.every_s and self.step == 0)
                    or waited >= self.heartbeat_s
                ):
                    return
                self._last[update.key] = (now, update.fraction)
        self.echo(update.line())


class RichBars:
    """Live progress bars on a terminal (rich), one per stage; a finished bar stays as a line.

    The live display runs while a stage is unfinished; meanwhile rich moves anything printed
    to stdout or stderr above the bars.

    Args:
        console: A ``rich.console.Console`` on the terminal.
    """

    def __init__(self, console: Any) -> None:
        self.console = console
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}
        self._open: set[str] = set()
        self._lock = threading.RLock()

    def update(self, update: Update) -> None:
        """Draw ``update`` (starting the live display for a new stage)."""
        from rich.progress import BarColumn, Progress, TextColumn

        with self._lock:
            if update.key in self._tasks and update.key not in self._open:
                return  # already finished
            if self._progress is None:
                self._progress = Progress(
                    TextColumn("{task.description:<10}"),
                    BarColumn(bar_width=24),
                    TextColumn("{task.fields[percent]:>3}% {task.fields[text]}"),
                    console=self.console,
                    refresh_per_second=4,
                )
                self._progress.start()
            task = self._tasks.get(update.key)
            if task is None:
                task = self._progress.add_task(update.stage, total=1.0, percent=0, text="")
                self._tasks[update.key] = task
                self._open.add(update.key)
            self._progress.update(
                task,
                completed=1.0 if update.finished else update.fraction,
                percent=update.percent,
                text=self._fit(update.text),
            )
            if update.finished:
                self._open.discard(update.key)
                if not self._open:
                    self.close()

    def _fit(self, text: str) -> str:
        """``text`` cut to the terminal's width: rich would squeeze the bar out instead."""
        room = max(8, self.console.width - 44)  # stage, bar, percent and the gaps
        return text if len(text) <= room else text[: room - 1] + "…"

    def close(self) -> None:
        """Stop the live display, leaving the bars drawn as they are."""
        with self._lock:
            if self._progress is not None:
                self._progress.refresh()
                self._progress.stop()
            self._progress = None
            self._tasks = {k: v for k, v in self._tasks.items() if k not in self._open}
            self._open.clear()


class Fanout:
    """Every update to each of ``sinks``; a sink that fails is logged and skipped."""

    def __init__(self, *sinks: ProgressSink) -> None:
        self.sinks = sinks

    def update(self, update: Update) -> None:
        """Hand ``update`` to every sink."""
        for sink in self.sinks:
            try:
                sink.update(update)
            except Exception:  # one broken display must not hide the others, nor fail a job
                logger.warning("progress sink %r failed", sink, exc_info=True)


@dataclass(frozen=True)
class Snapshot:
    """What the workers posted to a :class:`Board` so far."""

    objects: int
    """Objects read and decoded (good and failed)."""
    errors: int
    """Objects that failed to read or decode."""
    status: Any
    """The latest status a worker posted (e.g. ``pipeline.train.progress.TrainStatus``)."""


class _BoardActor:
    """The actor behind :class:`Board`: counters and the latest status, nothing else."""

    def __init__(self) -> None:
        self.objects = 0
        self.errors = 0
        self.status: Any = None

    def count(self, objects: int, errors: int) -> None:
        self.objects += objects
        self.errors += errors

    def post(self, status: Any) -> None:
        self.status = status

    def snapshot(self) -> Snapshot:
        return Snapshot(self.objects, self.errors, self.status)


class Board:
    """A progress board on Ray: workers post to ``handle`` without waiting; the driver polls.

    Why an actor: a decode task or a Ray Train rank cannot call back into the driver, and
    Ray Train reports metrics to the driver only at the end of ``fit``. A zero-CPU actor on
    the driver's node costs one small process, and a post is a fire-and-forget call, so the
    workers never wait on progress. A lost board loses progress, never the job.
    """

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        """The actor handle: what the workers get (``handle.count.remote(n, errors)``,
        ``handle.post.remote(status)``)."""

    @classmethod
    def start(cls) -> Board:
        """A new board next to this driver (Ray must be initialised)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor = ray.remote(num_cpus=0, max_restarts=0)(_BoardActor)
        node = ray.get_runtime_context().get_node_id()
        handle = actor.options(
            name=None,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=True),
        ).remote()
        return cls(handle)

    def snapshot(self, timeout_s: float = 30.0) -> Snapshot | None:
        """What the board holds now; None if it cannot be read."""
        import ray

        try:
            snapshot: Snapshot = ray.get(self.handle.snapshot.remote(), timeout=timeout_s)
        except Exception:
            logger.warning("progress board unavailable", exc_info=True)
            return None
        return snapshot

    @contextlib.contextmanager
    def follow(self, show: Callable[[Snapshot], None], every_s: float = 1.0) -> Iterator[None]:
        """Call ``show`` with a snapshot every ``every_s`` seconds while the block runs, and
        once more at its end.

        ``show`` runs in a thread of its own, with this thread's context variables (so a
        Prefect task's run context reaches a progress artifact).
        """
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(every_s):
                snapshot = self.snapshot()
                if snapshot is None:
                    return
                _call(show, snapshot)

        context = contextvars.copy_context()
        thread = threading.Thread(target=context.run, args=(poll,), name="progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            snapshot = self.snapshot()
            if snapshot is not None:
                _call(show, snapshot)

    def close(self) -> None:
        """End the actor."""
        import ray

        with contextlib.suppress(Exception):
            ray.kill(self.handle)


def _call(show: Callable[[Snapshot], None], snapshot: Snapshot) -> None:
    try:
        show(snapshot)
    except Exception:  # progress never fails a job
        logger.warning("progress display failed", exc_info=True)
