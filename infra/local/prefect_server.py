"""A local Prefect server for development and tests: ``prefect server start`` on 127.0.0.1.

Usage (stays in the foreground until Ctrl-C; prints the API URL when it is ready)::

    .venv/bin/python -m infra.local.prefect_server --home /tmp/fcnpipe-prefect --port 4200

then, in another shell::

    export PREFECT_API_URL=http://127.0.0.1:4200/api
    fcnpipe schedule train ...

The server keeps its SQLite database and settings in its own home directory
(``PREFECT_HOME``), so it never touches ``~/.prefect``; analytics are off.

In Python (the integration tests do this)::

    with PrefectServer(Path("/tmp/p")) as server:
        print(server.api_url)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from infra.local._net import HOST, free_port
from infra.local._process import LocalService, http_ok, launch, read_tail, stop_group

__all__ = ["PrefectServer"]


class PrefectServer(LocalService):
    """One ``prefect server start`` process with its own home and SQLite database."""

    def __init__(self, home: Path, *, port: int | None = None, ui: bool = False) -> None:
        """Describe the server; :meth:`start` (or ``with``) starts it.

        Args:
            home: ``PREFECT_HOME`` of the server (database, logs), created if missing.
            port: API port (default: a free one).
            ui: Serve the web UI too (slower to start).
        """
        self.home = home
        self.port = port or free_port()
        self.ui = ui
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        """What clients set ``PREFECT_API_URL`` to."""
        return f"http://{HOST}:{self.port}/api"

    @property
    def log_path(self) -> Path:
        """The server's stdout and stderr."""
        return self.home / "server.log"

    def env(self) -> dict[str, str]:
        """Variables for a client process of this server (added to the current ones)."""
        return {
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(self.home / "client"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the server and wait until its health endpoint answers.

        Raises:
            RuntimeError: It exited or did not answer in time (the message has its log).
        """
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.home}/prefect.db",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "true" if self.ui else "false",
        }
        env.pop("PREFECT_API_URL", None)
        prefect = Path(sys.executable).parent / "prefect"
        command = [str(prefect), "server", "start", "--host", HOST, "--port", str(self.port)]
        self._process = launch(command, self.log_path, env=env)
        self._wait_ready(
            self._process,
            lambda: http_ok(f"{self.api_url}/health"),
            timeout_s=timeout_s,
            poll_s=0.5,
            exited=lambda code: f"prefect server exited at start:\n{self.log_tail()}",
            timed_out=lambda error: (
                f"prefect server not ready after {timeout_s:.0f} s:\n{self.log_tail()}"
            ),
        )

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the server (its whole process group)."""
        process, self._process = self._process, None
        if process is not None:
            stop_group(process, timeout_s)

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log."""
        return read_tail(self.log_path, chars)


def main(argv: list[str] | None = None) -> int:
    """Run a server in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="PREFECT_HOME of the server")
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument("--ui", action="store_true", help="also serve the web UI")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the server on `kill` too
    with PrefectServer(args.home, port=args.port, ui=args.ui) as server:
        print(f"PREFECT_API_URL={server.api_url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
