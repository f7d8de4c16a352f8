"""Progress lines and bars (pipeline.progress), and what the console shows (pipeline.console)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

import pipeline.storage  # noqa: F401  (the error class the traceback names)
from pipeline.console import log_path, session
from pipeline.errors import ConfigError, InputError, ServiceError, user_error
from pipeline.progress import PlainLines, RichBars, Tracker, Update, format_duration, parse_line

pytestmark = pytest.mark.unit


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Collect:
    def __init__(self) -> None:
        self.updates: list[Update] = []

    def update(self, update: Update) -> None:
        self.updates.append(update)


def test_tracker_counts_rate_and_eta_from_the_first_result() -> None:
    clock, sink = Clock(), Collect()
    tracker = Tracker(
        "segmenting", 100, sink, unit="images", rate_unit="img/s", key="k", clock=clock
    )
    tracker.set(0, errors=0)
    clock.now = 30.0  # start-up: the actors load the model
    tracker.advance(10)
    clock.now = 40.0
    tracker.advance(20, errors=1)
    last = sink.updates[-1]
    assert last.line() == "segmenting:  30% 30/100 images, 1 error, 2.0 img/s, ETA 35s"
    clock.now = 75.0
    tracker.advance(70)
    tracker.finish()
    assert sink.updates[-1].finished
    assert sink.updates[-1].line() == (
        "segmenting: 100% 100/100 images, 1 error, 2.0 img/s, took 1m15s"
    )


def test_plain_lines_are_sparse_and_parse_back() -> None:
    clock, lines = Clock(), list[str]()
    plain = PlainLines(lines.append, every_s=10, step=0.1, heartbeat_s=300, clock=clock)
    tracker = Tracker("training", 1000, plain, unit="steps", count=False, key="t", clock=clock)
    for step in range(1, 1001):
        clock.now += 0.5  # 500 s in all: a line at most every 10 s and 10 %
        tracker.set(step, detail=f"step {step}")
    tracker.finish()
    assert 9 <= len(lines) <= 11, lines
    assert lines[-1].startswith("training: 100% step 1000")
    parsed = [parse_line(line, key="job") for line in lines]
    assert all(u is not None and u.stage == "training" for u in parsed)
    assert parsed[-1] is not None and parsed[-1].finished and parsed[-1].key == "job/training"
    assert parse_line("run train-1: 12 images, 50% of them") is None

    every, ticks = list[str](), Clock()
    log = PlainLines(every.append, every_s=10, step=0.0, clock=ticks)
    for _ in range(100):
        ticks.now += 1
        log.update(Update("k", "decoding", 0.5, "half"))
    assert len(every) == 9  # every 10 s, however little moved


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0.4, 59, 61, 3599, 7300)] == [
        "0s",
        "59s",
        "1m01s",
        "59m59s",
        "2h01m",
    ]


def test_rich_bars_draw_one_line_per_finished_stage() -> None:
    from rich.console import Console

    text = io.StringIO()
    bars = RichBars(Console(file=text, force_terminal=True, width=120))
    bars.update(Update("a", "training", 0.25, "epoch 1/4"))
    bars.update(Update("a", "training", 1.0, "epoch 4/4, took 3s", finished=True))
    bars.update(Update("a", "training", 1.0, "again"))  # a finished stage stays finished
    assert "100%" in text.getvalue() and "epoch 4/4" in text.getvalue()
    assert "again" not in text.getvalue()


def test_an_error_raised_in_a_ray_worker_is_found_behind_the_wrappers() -> None:
    class RayTaskError(Exception):  # what ray.get raises: the worker's exception in `cause`
        def __init__(self, cause: BaseException) -> None:
            super().__init__(f"ray::task (pid=1)\nTraceback ...\n{cause!r}")
            self.cause = cause

    RayTaskError.__module__ = "ray.exceptions"

    class WorkerGroupError(Exception):
        def __init__(self, failures: dict[int, BaseException]) -> None:
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    WorkerGroupError.__module__ = "ray.train.v2.api.exceptions"
    bad = ConfigError("model.safetensors: SHA-256 mismatch")
    assert user_error(RayTaskError(bad)) is bad
    assert user_error(WorkerGroupError({0: RayTaskError(bad)})) is bad
    # Ray Data keeps only the worker's traceback text (its cause: an empty UserCodeException).
    text = RayTaskError(Exception())
    text.args = (
        "Traceback (most recent call last):\n  File ...\n"
        "pipeline.storage.StorageUnavailable: s3://b: the endpoint did not answer\n",
    )
    found = user_error(text)
    assert isinstance(found, ServiceError) and str(found) == "s3://b: the endpoint did not answer"
    assert user_error(KeyError("a bug")) is None
    # A bug raised while handling bad input is still a bug.
    try:
        try:
            raise InputError("bad")
        except InputError:
            raise KeyError("bug") from None
    except KeyError as bug:
        assert user_error(bug) is None


def test_a_session_keeps_library_records_in_the_file_and_warnings_on_the_console(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FCNPIPE_LOG_DIR", str(tmp_path))
    path = log_path("unit")
    assert path.parent == tmp_path and path.name.startswith("unit-")
    library = logging.getLogger("ray.data.fake")
    with session(path) as out:
        out.echo("a line for the user")
        library.info("internal detail")
        library.warning("disk almost full")
        library.warning("disk almost full")  # each once
        logging.getLogger("ray").warning("Token authentication is enabled for this Ray cluster")
    captured = capsys.readouterr()
    assert captured.out == "a line for the user\n"
    assert captured.err == "warning: disk almost full\n"
    logged = path.read_text()
    for text in ("a line for the user", "internal detail", "disk almost full", "Token"):
        assert text in logged
    library.warning("after the session")  # restored: nothing of the session is left
    assert "after the session" not in path.read_text()
