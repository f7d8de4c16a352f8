"""The process mechanics of the local launchers (S3, Ray nodes, Prefect).

Each service is one command that leads a session of its own, its output in a log file. A
start waits until a readiness probe answers, and fails with the end of the log when the
process exits first or time runs out; a stop ends the whole process group.
"""

from __future__ import annotations

import abc
import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

LOG_TAIL_CHARS = 4000
"""How much of a log ``log_tail()`` and the start errors show."""


class ExitedAtStart(RuntimeError):
    """The process exited before it was ready."""


def launch(
    command: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str],
    cwd: Path | None = None,
    log_header: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``command`` as the leader of a new session, stdout and stderr into ``log_path``.

    A new session: stopping signals the whole process group, and Ctrl-C in the terminal
    that started it does not reach the service before its owner stops it. Its stdin is
    ``/dev/null``.

    Args:
        command: The program and its arguments.
        log_path: Its log; the directory is created if missing.
        env: Its whole environment.
        cwd: Its working directory (default: this process's).
        log_header: Keep the log and append a line with this text and the time before the
            new output; where None the log starts empty.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb" if log_header is None else "ab") as log:
        if log_header is not None:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {log_header}\n".encode())
            log.flush()
        return subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def http_ok(request: str | urllib.request.Request) -> bool:
    """Whether a GET answers 200 within 2 s (a readiness probe; no answer raises)."""
    with urllib.request.urlopen(request, timeout=2) as response:
        return response.status == 200


def signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    """Send ``signum`` to the process group ``process`` leads, members left behind included.

    Not once the leader has been reaped and its pid has gone to another process (which may
    lead a group of its own). While members of ours remain, the kernel keeps their group id
    from being reused, so a pid no process has means the group is still ours.
    """
    if process.returncode is not None and _pid_in_use(process.pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def _pid_in_use(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def stop_group(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM to the group ``process`` leads, wait up to ``timeout_s`` for the leader, then
    SIGKILL to whatever of the group is left (even if the leader exited), and reap it."""
    signal_group(process, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout_s)
    signal_group(process, signal.SIGKILL)
    process.wait()


def read_tail(log_path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """The last ``chars`` characters of a log, or ``""`` where there is none yet.

    Raises:
        OSError: It is there but cannot be read.
    """
    try:
        return log_path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


class LocalService(abc.ABC):
    """The base of the launchers: ``with`` starts and stops; a start that fails stops."""

    @abc.abstractmethod
    def start(self) -> None:
        """Start and wait until the service is ready."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop what runs (nothing where nothing does)."""

    def _wait_ready(
        self,
        process: subprocess.Popen[bytes],
        ready: Callable[[], bool],
        *,
        timeout_s: float,
        poll_s: float,
        exited: Callable[[int], str],
        timed_out: Callable[[str], str],
    ) -> None:
        """Poll ``ready`` until it returns True; on any failure :meth:`stop`, then raise.

        Ctrl-C counts as a failure: the service leads a session that Ctrl-C does not reach,
        and ``__exit__`` does not run when ``__enter__`` raises.

        Args:
            process: The service's process.
            ready: The probe; returning False or raising means "not ready yet".
            timeout_s: How long to wait.
            poll_s: The pause between probes.
            exited: The error message when the process exits first, given its exit code
                (called then, so it can carry the log).
            timed_out: The error message at the deadline, given the last probe error.

        Raises:
            ExitedAtStart: The process exited first.
            RuntimeError: It was not ready within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        last_error = "no answer yet"
        try:
            while True:
                code = process.poll()
                if code is not None:
                    raise ExitedAtStart(exited(code))
                try:
                    if ready():
                        return
                except Exception as exc:  # any failure here means "not ready yet"
                    last_error = f"{type(exc).__name__}: {exc}"
                if time.monotonic() > deadline:
                    raise RuntimeError(timed_out(last_error))
                time.sleep(poll_s)
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
