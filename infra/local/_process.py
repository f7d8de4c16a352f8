"""Process groups of the local launchers: each service leads a session of its own."""

from __future__ import annotations

import contextlib
import os
import subprocess


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
