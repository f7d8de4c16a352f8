"""Run the installed ``fcnpipe`` console script the way a user does: in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

FCNPIPE = str(Path(sys.executable).parent / "fcnpipe")


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
