"""A command in a real terminal: tmux runs it in a detached pane the test reads (capture-pane).

Each :class:`Pane` has a tmux server of its own (``tmux -L <unique name>``), so tests never
touch a person's sessions, and killing it ends the command.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["Pane", "ensure_tmux"]


def ensure_tmux(timeout_s: float = 300) -> str:
    """The tmux binary, installed with apt-get where absent.

    Raises:
        RuntimeError: It cannot be installed (the message has apt-get's last lines).
    """
    found = shutil.which("tmux")
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "tmux"]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=timeout_s)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout_s)
    found = shutil.which("tmux")
    if done.returncode != 0 or not found:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise RuntimeError(f"cannot install tmux with apt-get:\n{tail}")
    return found


class Pane:
    """``command`` running in a tmux pane of ``width`` x ``height`` cells.

    Args:
        tmux: The tmux binary.
        command: The command and its arguments.
        env: Its environment (on top of this process's).
        width: Columns of the terminal.
        height: Rows of the terminal.
    """

    def __init__(
        self,
        tmux: str,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        width: int = 160,
        height: int = 50,
    ) -> None:
        name = f"fcnpipe-test-{uuid.uuid4().hex[:12]}"
        self.tmux = [tmux, "-L", name, "-f", "/dev/null"]
        variables = [f"{k}={v}" for k, v in (env or {}).items()]
        # The exit status goes to a file: tmux 3.3 leaves #{pane_dead_status} empty when the
        # command is the pane's own process (a Ray driver, here), so a shell runs it.
        self._status = Path(tempfile.gettempdir()) / f"{name}.status"
        run = shlex.join(["env", *variables, *command])
        line = shlex.join(["sh", "-c", f'{run}; echo "$?" > {shlex.quote(str(self._status))}'])
        # The pane stays once the command ends, so its screen and exit status can be read.
        self._tmux("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height))
        self._tmux("set-option", "-t", "t", "remain-on-exit", "on")
        self._tmux("respawn-pane", "-k", "-t", "t", line)

    def _tmux(self, *args: str) -> str:
        done = subprocess.run(
            [*self.tmux, *args], capture_output=True, text=True, timeout=30, check=True
        )
        return done.stdout

    def screen(self, *, history: bool = False) -> list[str]:
        """The lines the terminal shows now (``history``: and those scrolled off)."""
        args = ["capture-pane", "-p", "-t", "t"] + (["-S", "-"] if history else [])
        return self._tmux(*args).splitlines()

    def exit_status(self) -> int | None:
        """The command's exit status once it ended; None while it runs."""
        if self._tmux("display", "-p", "-t", "t", "#{pane_dead}").strip() != "1":
            return None
        try:
            return int(self._status.read_text())
        except (FileNotFoundError, ValueError):
            return -1  # the shell itself was killed

    def close(self) -> None:
        """End the command and the tmux server."""
        subprocess.run([*self.tmux, "kill-server"], capture_output=True, timeout=30)
        self._status.unlink(missing_ok=True)

    def __enter__(self) -> Pane:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
