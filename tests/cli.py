"""Run ``fcnpipe`` the way a user does (the installed console script, in a subprocess), or
its entry point in this process where only its messages and exit code are checked."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

FCNPIPE = str(Path(sys.executable).parent / "fcnpipe")


class CliResult(NamedTuple):
    """What an in-process ``fcnpipe`` call exited with and printed."""

    returncode: int
    stdout: str
    stderr: str


def fcnpipe(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run ``fcnpipe ARGS`` with this process's environment (plus ``env``); never raises.

    Args:
        args: command-line arguments.
        env: variables to add to (or override in) the environment.
        timeout: seconds before the command is killed.
    """
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("FCNPIPE_DEBUG", None)
    return subprocess.run(
        [FCNPIPE, *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )


def fcnpipe_in_process(*args: str, env: Mapping[str, str] | None = None) -> CliResult:
    """Run ``fcnpipe ARGS`` through its console-script entry point in this process.

    The same code as the installed script (``flows.cli:main``: argument parsing, the
    command, the one-line error handler), without a new interpreter importing torch, Ray and
    Prefect again (about 9 s a call here). For checks of what a command says and exits with;
    ``fcnpipe`` covers the process itself. The environment and ``sys.argv`` are restored
    afterwards; a command that started Ray in this process fails the call.

    Args:
        args: command-line arguments.
        env: variables to add to (or override in) the environment for the call.
    """
    import ray

    from flows.cli import main

    saved_env, saved_argv = dict(os.environ), sys.argv
    was_running = ray.is_initialized()
    stdout, stderr = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    try:
        os.environ.update(env or {})
        os.environ.pop("FCNPIPE_DEBUG", None)
        sys.argv = ["fcnpipe", *args]
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main()
            except SystemExit as exc:
                code = exc.code
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
    if not was_running and ray.is_initialized():
        ray.shutdown()
        raise AssertionError(f"fcnpipe {' '.join(args)} started Ray in the test process")
    returncode = code if isinstance(code, int) else (0 if code is None else 1)
    return CliResult(returncode, stdout.getvalue(), stderr.getvalue())
