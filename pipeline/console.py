"""What a person sees: the job's own lines and its progress; everything else in a log file.

Usage (``fcnpipe`` commands and ``python -m pipeline.jobs`` open one session each):
    with session(log_path("train", output_uri), level=level_from(verbose)) as out:
        out.echo(f"log: {out.log_path}")
        train(config, echo=out.echo)  # progress goes to progress_sink()

Quiet (the default; ``FCNPIPE_LOG_LEVEL=WARNING``): the console shows the job's lines (``echo``,
and lines Ray workers mark with :func:`tell`), its progress (live bars on a terminal, a
plain line now and then otherwise: :mod:`pipeline.progress`), and warnings and errors of the
libraries, each once. Everything goes to the log file: Ray's and Prefect's INFO records,
Ray Data's execution logs, every line the Ray workers print (with Ray's ``(Name pid=...)``
prefix), Python warnings (deprecations), and what Ray's C++ core writes to this process's
stderr (the file takes over file descriptor 2; Python's ``sys.stderr`` keeps the terminal).

Verbose (``--verbose``, or ``FCNPIPE_LOG_LEVEL=INFO`` / ``DEBUG``): the console shows all of
it too, as Ray and Prefect print it; the log file still gets everything.

Without a session (a notebook calling ``train()``), nothing is rerouted: Ray and Prefect
print as they do, and progress goes to stderr.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.progress import Fanout, PlainLines, ProgressSink, RichBars

__all__ = [
    "ELSEWHERE_ONLY",
    "LOG_DIR_ENV",
    "LOG_LEVEL_ENV",
    "NOT_ON_CONSOLE",
    "Output",
    "attach_ray",
    "current",
    "level_from",
    "log_path",
    "progress_sink",
    "session",
    "tell",
]

LOG_LEVEL_ENV = "FCNPIPE_LOG_LEVEL"
"""Console level of the libraries' messages: WARNING (the default), INFO, DEBUG or ERROR."""
LOG_DIR_ENV = "FCNPIPE_LOG_DIR"
"""Directory of the log files (default: the output root's ``_logs``, when it is local)."""

_USER_MARK = "[fcnpipe] "
"""Starts a line a Ray worker prints for the user (:func:`tell`)."""

NOT_ON_CONSOLE = {"fcnpipe_console": False}
"""``extra`` of a log record that is already on the console (or must not be): file only."""
ELSEWHERE_ONLY = {"fcnpipe_console": False, "fcnpipe_file": False}
"""``extra`` of a log record meant for another handler (Prefect's API) only: the console and
the log file have it already."""

_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
           "ERROR": logging.ERROR}  # fmt: skip

# Library loggers whose console handlers the session replaces (their records then reach the
# root logger: the log file, and the console at the session's level).
_LIBRARIES = ("ray", "prefect", "uvicorn", "fastapi", "py")

# Library warnings nobody can act on, kept off the console in quiet mode (the log file has
# them): (logger prefix, text in the message).
_NOISE = (
    # Ray 2.60 turns token auth on for a local cluster and says so at each start.
    ("ray", "Token authentication is enabled"),
    # The session turns Ray Data's progress bars off (ours replace them).
    ("ray.data", "Progress bars disabled"),
    # Ray Data logs a failed execution (and its whole traceback) before it raises the error
    # to the driver, which prints it as one line (``pipeline.errors.user_error``).
    ("ray.data.exceptions", ""),
    ("ray.data._internal.execution", "failing execution"),
    ("py.warnings", "DeprecationWarning"),
    ("py.warnings", "FutureWarning"),
)

# The loggers whose INFO records the log file keeps; other libraries' from WARNING (verbose:
# from the session's level), but for these, chatty even then: a line per HTTP request
# (Prefect's client, object stores), per ONNX optimisation pass.
_OURS = ("pipeline", "flows", "fcnpipe")
_CHATTY = ("httpx", "httpcore", "urllib3", "botocore", "s3fs", "aiobotocore", "onnxscript",
           "onnx_ir")  # fmt: skip


def tell(message: str) -> None:
    """Print a line for the user from inside a Ray worker (a training rank, an actor).

    Ray forwards a worker's output to the driver; a session shows this line on the console
    (without Ray's prefix) and keeps the worker's other lines in the log file.
    """
    print(_USER_MARK + message, flush=True)


def level_from(verbose: bool) -> int:
    """The console level: INFO with ``verbose``, else ``FCNPIPE_LOG_LEVEL``, else WARNING.

    Raises:
        ConfigError: ``FCNPIPE_LOG_LEVEL`` is not a level name.
    """
    if verbose:
        return logging.INFO
    name = os.environ.get(LOG_LEVEL_ENV, "").strip().upper()
    if not name:
        return logging.WARNING
    if name not in _LEVELS:
        raise ConfigError(f"{LOG_LEVEL_ENV} must be one of {', '.join(_LEVELS)}, got {name!r}")
    return _LEVELS[name]


def log_path(name: str, root: str | Path | None = None) -> Path:
    """Where a command's log file goes: ``<dir>/<name>-<local time>.log``.

    ``<dir>`` is ``FCNPIPE_LOG_DIR`` if set, else ``<root>/_logs`` when ``root`` is a local
    path (an output root), else ``fcnpipe-logs`` in the system's temporary directory.

    Args:
        name: What runs, e.g. ``train`` or ``demo``.
        root: A local directory or URI to put the logs under; None or a remote URI: the
            temporary directory.
    """
    directory = os.environ.get(LOG_DIR_ENV)
    if directory:
        base = Path(directory).expanduser()
    elif root is not None and _local_path(str(root)) is not None:
        base = Path(_local_path(str(root)) or ".") / "_logs"
    else:
        base = Path(tempfile.gettempdir()) / "fcnpipe-logs"
    return base.absolute() / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"


def _local_path(uri: str) -> str | None:
    if "://" not in uri:
        return uri
    if uri.lower().startswith("file://"):
        return uri[len("file://") :]
    return None


@dataclass
class Output:
    """An open session (see the module docstring)."""

    log_path: Path | None
    """The log file (None: no file; everything on the console as without a session)."""
    level: int
    """Console level of the libraries' messages."""
    progress: ProgressSink
    """Where the jobs' progress goes: the console (and the log file)."""
    _console: _ConsoleHandler = field(repr=False)
    _seen: set[str] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def verbose(self) -> bool:
        """Whether the libraries' INFO messages and the workers' output reach the console."""
        return self.level <= logging.INFO

    def echo(self, line: str) -> None:
        """A line for the user: on stdout, and in the log file."""
        self.say(line)
        _log.info(line, extra=NOT_ON_CONSOLE)

    def say(self, line: str, *, once: bool = False) -> None:
        """A line on stdout only (the caller logs it elsewhere); ``once``: skip a repeat."""
        with self._lock:
            if once:
                if line in self._seen:
                    return
                self._seen.add(line)
        print(line, file=sys.stdout, flush=True)

    def _worker_output(self, ray_print: Callable[[dict[str, Any]], None] | None, data: Any) -> None:
        """Ray's worker-output handler: every line to the log file; the user's to the console."""
        pid = data.get("pid")
        name = data.get("actor_name") or data.get("task_name") or ""
        who = f"{name} pid={pid}" if name else ("raylet" if pid == "raylet" else f"pid={pid}")
        if data.get("ip") != data.get("localhost"):
            who += f", ip={data.get('ip')}"
        lines = data.get("lines", [])
        if pid == "autoscaler":  # its whole log; Ray prints only the events in it
            from ray._private.worker import filter_autoscaler_events

            lines = list(filter_autoscaler_events(lines))
        for line in lines:
            _workers.info("(%s) %s", who, line, extra=NOT_ON_CONSOLE)
            if not self.verbose and _USER_MARK in line:
                self.say(line.split(_USER_MARK, 1)[1], once=True)
        if self.verbose and ray_print is not None:
            ray_print(data)


_log = logging.getLogger("fcnpipe")
_workers = logging.getLogger("fcnpipe.workers")

_current: Output | None = None
_ray_restore: list[Callable[[], None]] = []


def current() -> Output | None:
    """The open session, if any."""
    return _current


def progress_sink() -> ProgressSink:
    """Where a job's progress goes: the session's display, else bars on a terminal or sparse
    plain lines on stderr."""
    if _current is not None:
        return _current.progress
    return _display(sys.stderr)


def _display(stream: Any) -> ProgressSink:
    if _isatty(stream):
        from rich.console import Console

        return RichBars(Console(stderr=True))
    return PlainLines(lambda line: print(line, file=sys.stderr, flush=True))


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _ConsoleHandler(logging.Handler):
    """The libraries' log records on the console: at the session's level, each once."""

    def __init__(self, level: int) -> None:
        super().__init__(logging.NOTSET)
        self.threshold = level
        self._seen: set[str] = set()
        self._lock_seen = threading.Lock()
        self.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )

    @property
    def quiet(self) -> bool:
        return self.threshold > logging.INFO

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "fcnpipe_console", True) is False or record.levelno < self.threshold:
            return
        if not self.quiet:
            self._write(self.format(record))
            return
        message = record.getMessage()
        if any(record.name.startswith(p) and text in message for p, text in _NOISE):
            return
        # One line: a traceback (or a warning's source line) is in the log file.
        first = next((line for line in message.splitlines() if line.strip()), "")
        self.show(f"{record.levelname.lower()}: {first.strip()}")

    def show(self, line: str) -> None:
        """Write ``line`` unless it was written before."""
        with self._lock_seen:
            if line in self._seen:
                return
            self._seen.add(line)
        self._write(line)

    def _write(self, text: str) -> None:
        try:
            stream = sys.stderr  # at emit time: rich's live display may have replaced it
            stream.write(text + "\n")
            stream.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": text}))


def _is_console(handler: logging.Handler) -> bool:
    """A handler that writes to the terminal (not a file, not an API)."""
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler
    )


def _take_over_loggers(handlers: list[logging.Handler], level: int) -> Callable[[], None]:
    """Route the libraries' records to ``handlers`` on the root logger; returns the undo."""
    saved: list[tuple[logging.Logger, list[logging.Handler], bool, int]] = []
    root = logging.getLogger()
    saved.append((root, list(root.handlers), root.propagate, root.level))
    for handler in [h for h in root.handlers if _is_console(h)]:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(min(level, logging.WARNING))
    for name in list(logging.root.manager.loggerDict):
        logger = logging.root.manager.loggerDict[name]
        if not isinstance(logger, logging.Logger):
            continue
        if name.split(".")[0] not in _LIBRARIES:
            continue
        console = [h for h in logger.handlers if _is_console(h)]
        if not console:
            continue
        saved.append((logger, list(logger.handlers), logger.propagate, logger.level))
        for handler in console:
            logger.removeHandler(handler)
        logger.propagate = True  # to the root: the log file and our console
    levels = {name: min(level, logging.INFO) for name in _OURS}
    levels.update({name: max(level, logging.WARNING) for name in _CHATTY})
    for name, wanted in levels.items():
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            saved.append((logger, list(logger.handlers), logger.propagate, logger.level))
            logger.setLevel(wanted)

    def undo() -> None:
        for logger, old, propagate, old_level in reversed(saved):
            logger.handlers[:] = old
            logger.propagate = propagate
            logger.setLevel(old_level)

    return undo


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """File descriptor 2 into ``path`` (what C++ libraries and child processes write there),
    while Python's ``sys.stderr`` keeps writing to the terminal (or whatever it was)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fd = os.dup(2)
    replaced = None
    try:
        with open(path, "ab") as target:
            os.dup2(target.fileno(), 2)
        try:
            python_fd = sys.stderr.fileno()
        except (AttributeError, ValueError, io.UnsupportedOperation):
            python_fd = -1
        if python_fd == 2:
            replaced = sys.stderr
            sys.stderr = open(  # noqa: SIM115 - closed in finally
                saved_fd,
                "w",
                buffering=1,
                encoding=getattr(replaced, "encoding", None) or "utf-8",
                errors="backslashreplace",
                closefd=False,
            )
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved_fd, 2)
        if replaced is not None:
            ours, sys.stderr = sys.stderr, replaced
            with contextlib.suppress(Exception):
                ours.close()
        os.close(saved_fd)


@contextlib.contextmanager
def session(
    log_file: Path | None,
    *,
    level: int = logging.WARNING,
    plain_every_s: float = 10.0,
    plain_step: float = 0.1,
) -> Iterator[Output]:
    """Quiet console output, with everything in ``log_file`` (see the module docstring).

    Args:
        log_file: The log file (its directory is made); None: no rerouting at all.
        level: Console level of the libraries' messages (:func:`level_from`).
        plain_every_s: Least seconds between two plain progress lines of a stage (when the
            console is not a terminal).
        plain_step: Least progress between two plain lines; 0: a line every
            ``plain_every_s`` (a Ray Job's log, which the flow following it re-renders).
    """
    global _current
    if _current is not None:  # nested (a command inside a command): the outer one rules
        yield _current
        return
    with contextlib.ExitStack() as stack:
        handlers: list[logging.Handler] = []
        console = _ConsoleHandler(level)
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            to_file = logging.FileHandler(log_file, encoding="utf-8")
            to_file.setLevel(min(level, logging.INFO))
            to_file.addFilter(lambda record: getattr(record, "fcnpipe_file", True))
            to_file.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
            )
            stack.callback(to_file.close)
            handlers = [to_file, console]
            # Ray Data configures its loggers on import: import it first, then take over.
            import ray.data  # noqa: F401

            stack.callback(_take_over_loggers(handlers, level))
            logging.captureWarnings(True)
            stack.callback(logging.captureWarnings, False)
            if level > logging.INFO:
                stack.enter_context(_stderr_to(log_file))
            _log.info("%s on %s", " ".join(sys.argv), socket.gethostname())
        display = _display(sys.stderr) if log_file is not None else progress_sink()
        if isinstance(display, PlainLines):
            display.every_s, display.step = plain_every_s, plain_step
        sinks: list[ProgressSink] = [display]
        if log_file is not None:
            sinks.append(PlainLines(lambda line: _log.info(line, extra=NOT_ON_CONSOLE), step=0.0))
        out = Output(log_path=log_file, level=level, progress=Fanout(*sinks), _console=console)
        _current = out
        try:
            if log_file is not None:
                attach_ray()  # if Ray already runs in this process
            yield out
        finally:
            _current = None
            if isinstance(display, RichBars):
                display.close()
            _detach_ray()


def attach_ray() -> None:
    """Take over Ray's printing of the workers' output for the open session (if any).

    Called once Ray is initialised (``pipeline.cluster.ensure_ray``). The workers' lines
    then go to the log file, and only the lines for the user (:func:`tell`) to the console;
    verbose, Ray prints them too, as it does without a session.
    """
    out = _current
    if out is None or out.log_path is None or _ray_restore:
        return
    import ray

    if not ray.is_initialized():
        return
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    # Ray registers its printer under this name, and ray.shutdown() removes it by the name:
    # ours takes the same, so a shutdown removes ours instead.
    name = "ray_print_logs"
    with dispatcher._lock:
        previous = [handler for key, handler in dispatcher.handlers if key == name]
    dispatcher.remove_handler(name)
    dispatcher.add_handler(
        name, functools.partial(out._worker_output, previous[0] if previous else None)
    )

    # The raylet's error messages (a task that failed and is retried, with the worker's
    # traceback) do not go through the dispatcher: Ray's error thread calls this function.
    import ray._private.worker as ray_worker

    ray_stdstream = ray_worker.print_to_stdstream

    def print_to_stdstream(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            ray_stdstream(data, ignore_prefix)
            return
        out._worker_output(functools.partial(ray_stdstream, ignore_prefix=ignore_prefix), data)

    ray_worker.print_to_stdstream = print_to_stdstream

    def restore() -> None:
        ray_worker.print_to_stdstream = ray_stdstream
        dispatcher.remove_handler(name)
        if previous and ray.is_initialized():
            dispatcher.add_handler(name, previous[0])

    _ray_restore.append(restore)


def _detach_ray() -> None:
    while _ray_restore:
        _ray_restore.pop()()
