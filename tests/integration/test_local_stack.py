"""``python -m infra.local.stack``: the local S3 server and Ray cluster in the background.

What a user relies on: ``up`` returns with S3 answering the credentials that ``env.sh``
gives, the Jobs API answering the token (and refusing requests without it) and every node
alive; no secret is printed, put on a command line or written outside the 0600 files;
a second ``up`` in the same directory or on a taken port is one line; ``down`` leaves no
process of the stack and no open port, and a second ``down`` is fine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import s3fs

from infra.local._net import HOST, free_ports
from infra.local.stack import MARKER, StackState, processes

pytestmark = pytest.mark.integration

# Variables that would make `up` reuse secrets, or clients reach somewhere else.
_CLEARED = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_PROFILE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_ADDRESS",
    MARKER,
)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    env["AWS_CONFIG_FILE"] = "/nonexistent/fcnpipe-test-aws-config"
    env["AWS_SHARED_CREDENTIALS_FILE"] = "/nonexistent/fcnpipe-test-aws-credentials"
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    return {**env, **extra}


def _stack(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infra.local.stack", *args],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _sourced(env_sh: Path) -> dict[str, str]:
    """The environment of a shell that had a stale token, then sourced ``env.sh``."""
    shell = subprocess.run(
        ["bash", "-c", 'source "$0" && env -0', str(env_sh)],
        env=_clean_env(RAY_AUTH_TOKEN="stale-token-from-another-cluster"),
        capture_output=True,
        check=True,
    )
    pairs = (item.split("=", 1) for item in shell.stdout.decode().split("\0") if "=" in item)
    return dict(pairs)


def _get(url: str, token: str | None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        assert r.status == 200
        return json.load(r)


def _refused(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((HOST, port)) != 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:  # exited meanwhile
        return ""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.fixture
def stack_dir() -> Iterator[Path]:
    """A short directory for a stack (Ray's socket paths stay below 107 bytes); the stack in
    it is stopped at the end whatever happened, and as a last resort whatever ``down`` left
    of it is killed: the recorded process groups that still hold some of it, then each
    process (never a group whose pid has gone to another process since)."""
    directory = Path(tempfile.mkdtemp(prefix="st", dir="/tmp"))
    try:
        yield directory
    finally:
        state = StackState.load(directory)
        with contextlib.suppress(subprocess.TimeoutExpired):
            _stack("down", "--dir", str(directory), timeout=120)
        left = processes(state) if state else []
        recorded = {c.pid for c in state.components if c.leader} if state else set()
        for pgid in recorded & {p.pgid for p in left}:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        for process in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(process.pid, signal.SIGKILL)
        # Ray's and weed's data (the secrets files too); not a leak check: the test did that.
        subprocess.run(["rm", "-rf", str(directory)], check=False)


def test_up_status_down(stack_dir: Path) -> None:
    dashboard_port, s3_port = free_ports(2)
    ports = [f"--dashboard-port={dashboard_port}", f"--s3-port={s3_port}"]
    sizes = ["--workers=1", "--head-cpus=1", "--worker-cpus=1", "--bucket=stack-test"]
    started = time.monotonic()
    up = _stack("up", "--dir", str(stack_dir), *ports, *sizes)
    up_s = time.monotonic() - started
    assert up.returncode == 0, up.stderr + (stack_dir / "stack.log").read_text()
    print(f"up took {up_s:.1f} s")

    state = StackState.load(stack_dir)
    assert state is not None and state.status == "up"
    assert [c.name for c in state.components] == ["stack", "s3", "ray-head", "ray-worker-1"]
    assert state.s3_endpoint == f"http://{HOST}:{s3_port}"
    assert state.jobs_api == f"http://{HOST}:{dashboard_port}"
    assert state.jobs_api in up.stdout and state.s3_endpoint in up.stdout

    # Secrets: in 0600 files only; env.sh points at them.
    token_file, credentials_file = Path(state.token_file), Path(state.credentials_file)
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert credentials_file.stat().st_mode & 0o777 == 0o600
    env = _sourced(stack_dir / "env.sh")
    token = token_file.read_text().strip()
    secret = env["AWS_SECRET_ACCESS_KEY"]
    assert secret and len(token) >= 32
    assert env["AWS_ENDPOINT_URL"] == state.s3_endpoint
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] == str(token_file)
    assert "RAY_AUTH_TOKEN" not in env  # the stale one is gone: it would win over the file
    # Nowhere else: not printed, not in the files of the stack, not on a command line.
    texts = [up.stdout, up.stderr]
    texts += [(stack_dir / name).read_text() for name in ("stack.json", "env.sh", "stack.log")]
    texts += [_cmdline(p.pid) for p in processes(state)]
    for text in texts:
        assert secret not in text and token not in text

    # S3 answers the credentials env.sh gives.
    fs = s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"],
        secret=secret,
        endpoint_url=env["AWS_ENDPOINT_URL"],
        client_kwargs={"region_name": env["AWS_REGION"]},
        skip_instance_cache=True,
    )
    fs.pipe("stack-test/hello.txt", b"hello")
    assert fs.cat("stack-test/hello.txt") == b"hello"

    # The Jobs API answers the token and refuses a request without it; both nodes are alive.
    assert _get(f"{state.jobs_api}/api/jobs/", token) == []
    with pytest.raises(urllib.error.HTTPError) as refused:
        _get(f"{state.jobs_api}/api/jobs/", None)
    assert refused.value.code in (401, 403)
    nodes = _get(f"{state.jobs_api}/api/v0/nodes?detail=false", token)["data"]["result"]["result"]
    assert sorted(n["state"] for n in nodes) == ["ALIVE", "ALIVE"]
    # Ray's own CLI finds the token through env.sh (RAY_AUTH_TOKEN_PATH).
    ray_cli = subprocess.run(
        ["bash", "-c", 'source "$0" && "$1" job list --address "$2"', str(stack_dir / "env.sh"),
         str(Path(sys.executable).parent / "ray"), state.jobs_api],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert ray_cli.returncode == 0, ray_cli.stderr[-2000:]

    status = _stack("status", "--dir", str(stack_dir))
    assert status.returncode == 0 and "2 of 2 nodes alive" in status.stdout, status.stdout

    # A second stack in the same directory, or on a taken port: one line, nothing started.
    again = _stack("up", "--dir", str(stack_dir), *ports, *sizes)
    assert again.returncode == 1 and "already up" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1, again.stderr
    other_dir = Path(tempfile.mkdtemp(prefix="st", dir="/tmp"))
    try:
        taken = _stack("up", "--dir", str(other_dir), *ports, *sizes)
    finally:
        subprocess.run(["rm", "-rf", str(other_dir)], check=False)
    assert taken.returncode == 1, taken.stdout
    assert f"port {dashboard_port} (Ray dashboard) is in use" in taken.stderr
    assert len(taken.stderr.strip().splitlines()) == 1, taken.stderr

    live_before = processes(state)
    assert len(live_before) >= 8  # serve, weed, and each node's ray start, raylet...
    started = time.monotonic()
    down = _stack("down", "--dir", str(stack_dir))
    down_s = time.monotonic() - started
    assert down.returncode == 0 and "stopped the stack" in down.stdout, down.stderr
    print(f"down took {down_s:.1f} s")
    assert [p.pid for p in live_before if _alive(p.pid)] == []
    assert [c.pid for c in state.components if _alive(c.pid)] == []
    assert processes(state) == []
    gcs_port = int(state.ray_address.rsplit(":", 1)[1])
    assert all(_refused(port) for port in (dashboard_port, s3_port, gcs_port))
    assert not (stack_dir / "stack.json").exists()

    second = _stack("down", "--dir", str(stack_dir))
    assert second.returncode == 0 and "nothing to stop" in second.stdout
    assert _stack("status", "--dir", str(stack_dir)).returncode == 1
