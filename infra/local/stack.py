"""The local stack in the background: SeaweedFS S3 and a multi-node ``ray start`` cluster.

Usage::

    .venv/bin/python -m infra.local.stack up --dir /tmp/fcnpipe --workers 2
    source /tmp/fcnpipe/env.sh    # AWS_ENDPOINT_URL, S3 credentials, RAY_AUTH_TOKEN_PATH
    fcnpipe dataset synth s3://fcnpipe/shapes --num-images 100
    fcnpipe flow train-and-segment s3://fcnpipe/shapes --output s3://fcnpipe/out \
        --ray-address http://127.0.0.1:8265
    .venv/bin/python -m infra.local.stack status --dir /tmp/fcnpipe
    .venv/bin/python -m infra.local.stack down --dir /tmp/fcnpipe

``up`` starts ``serve`` (the same stack in the foreground, until Ctrl-C or SIGTERM) as a
detached process, waits until S3 answers a signed request, the Jobs API answers with the
token and every node is alive, and returns; the stack outlives it. Options: ``--workers 2
--head-cpus 1 --worker-cpus 1 --dashboard-port 8265 --s3-port 8333 --bucket fcnpipe
(repeatable) --region us-east-1 --object-store-mb N --timeout 300``. S3 and the dashboard
(Jobs API) listen on 127.0.0.1 (see ``infra.local.ray_cluster`` for Ray's other ports).
Errors are one line (a stack already up in DIR, a port in use, a service that did not
start); the services' own logs are under DIR.

``DIR`` holds ``stack.json`` (process ids, endpoints, ports; no secrets), ``env.sh``,
``token`` (the Ray token, 0600), ``s3-credentials.sh`` (0600, only where ``up`` made the
credentials up), ``stack.log`` (the output of ``serve``), ``s3/`` (weed's data and log) and
``ray/`` (Ray's temp dir and each node's log). Keep ``DIR`` short (32 characters at most):
Ray's Unix sockets live under it and their paths must stay below 107 bytes.

Secrets: the S3 credentials are ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` where both
are set (then no file holds them: ``env.sh`` leaves them to your environment), else made up
and written to ``s3-credentials.sh``, which ``env.sh`` sources. The Ray token is
``RAY_AUTH_TOKEN`` where set, else made up; ``env.sh`` points ``RAY_AUTH_TOKEN_PATH`` at its
file, which both Ray's own CLI and ``fcnpipe --ray-address`` read. Neither is ever printed
or put on a command line. The nodes get the endpoint and credentials in their environment,
so jobs reach S3 as they would on a cluster.

Stopping: weed and each node lead a session of their own, and so does a detached
``serve``; a process belongs to the stack if it is in one of these sessions, carries
``FCNPIPE_LOCAL_STACK=<id>`` in its environment (Ray job drivers, which Ray starts in
sessions of their own), or descends from such a process (see :func:`processes`). ``down``
sends SIGTERM to ``serve``, which stops the workers, the head and S3 in that order; then
SIGTERM, and after a grace period SIGKILL, to whatever of the stack is left. Nothing else
on the machine is touched: no ``ray stop``, no kill by name. ``down`` on a stopped stack
says so and exits 0. ``status`` exits 0 only if all of the stack runs and answers. Linux
only (it reads ``/proc``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from infra.local._net import HOST, port_in_use
from infra.local.ray_cluster import LocalRayCluster
from infra.local.seaweedfs import SeaweedS3

MARKER = "FCNPIPE_LOCAL_STACK"
"""The environment variable, set to the stack's id, that every process of a stack carries."""

STATE_FILE = "stack.json"
ENV_FILE = "env.sh"
TOKEN_FILE = "token"
CREDENTIALS_FILE = "s3-credentials.sh"
LOG_FILE = "stack.log"

# Ray's longest socket path is DIR/ray/session_<date>_<time>_<usec>_<pid>/sockets/dash_<the
# longest dashboard module>, and Unix socket paths stop at 107 bytes.
_MAX_DIR_CHARS = 107 - len(
    "/ray/session_2026-01-01_00-00-00_000000_4194304/sockets/dash_TaskEventsHead"
)
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_ERROR_PREFIX = "stack: error: "
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class StackError(RuntimeError):
    """A stack could not be started, stopped or read; the message is one line."""


@dataclass(frozen=True, kw_only=True)
class StackOptions:
    """What ``up`` and ``serve`` start."""

    directory: Path
    """State, logs, data and secrets of the stack (absolute; short, see the module doc)."""
    workers: int = 2
    """Worker nodes besides the head."""
    head_cpus: int = 1
    """CPUs the head offers to tasks (0: it runs none)."""
    worker_cpus: int = 1
    """CPUs each worker node offers."""
    dashboard_port: int = 8265
    """The Ray dashboard and Jobs API."""
    s3_port: int = 8333
    """The S3 endpoint."""
    buckets: tuple[str, ...] = ("fcnpipe",)
    """Buckets created at start (ones that exist are kept, with their objects)."""
    region: str = "us-east-1"
    """The region S3 clients sign with."""
    object_store_mb: int | None = None
    """Object store per node in MiB (default: Ray's, 30% of the machine's memory per node)."""

    def __post_init__(self) -> None:
        if not self.directory.is_absolute():
            raise ValueError(f"--dir must be absolute, got {self.directory}")
        if len(str(self.directory)) > _MAX_DIR_CHARS:
            raise ValueError(
                f"--dir {self.directory} is {len(str(self.directory))} characters; Ray's Unix "
                f"sockets under it need it to be at most {_MAX_DIR_CHARS}"
            )
        if self.workers < 0 or self.head_cpus < 0 or self.worker_cpus < 1:
            raise ValueError("need --workers >= 0, --head-cpus >= 0 and --worker-cpus >= 1")
        for name, port in (("--dashboard-port", self.dashboard_port), ("--s3-port", self.s3_port)):
            if not 0 < port < 65536:
                raise ValueError(f"{name} must be in 1..65535, got {port}")
        if self.dashboard_port == self.s3_port:
            raise ValueError(f"--dashboard-port and --s3-port are both {self.s3_port}")
        for bucket in self.buckets:
            if not _BUCKET.match(bucket):
                raise ValueError(f"--bucket {bucket!r}: 3-63 lowercase letters, digits, . and -")
        if self.object_store_mb is not None and self.object_store_mb < 80:
            raise ValueError(
                f"--object-store-mb must be at least 80 (Ray's minimum), got {self.object_store_mb}"
            )

    def argv(self) -> list[str]:
        """The ``serve`` arguments that rebuild these options."""
        args = [
            f"--dir={self.directory}",
            f"--workers={self.workers}",
            f"--head-cpus={self.head_cpus}",
            f"--worker-cpus={self.worker_cpus}",
            f"--dashboard-port={self.dashboard_port}",
            f"--s3-port={self.s3_port}",
            f"--region={self.region}",
            *(f"--bucket={bucket}" for bucket in self.buckets),
        ]
        if self.object_store_mb is not None:
            args.append(f"--object-store-mb={self.object_store_mb}")
        return args


@dataclass(frozen=True)
class Component:
    """One service process of a stack."""

    name: str
    """``stack`` (the ``serve`` process), ``s3``, ``ray-head``, ``ray-worker-1``..."""
    pid: int
    start: int
    """Its start time (``/proc/PID/stat``), which tells it from a later process given the
    same pid."""
    leader: bool = True
    """Leads its own session and process group (all do but ``serve`` run in a terminal)."""

    @classmethod
    def of(cls, name: str, pid: int) -> Component:
        """Describe the running process ``pid``."""
        stat = _read_stat(pid)
        leader = stat is not None and stat.sid == pid and stat.pgid == pid
        return cls(name, pid, stat.start if stat else 0, leader)


@dataclass(kw_only=True)
class StackState:
    """``DIR/stack.json``: what runs and where; no secrets."""

    id: str
    """The value of ``FCNPIPE_LOCAL_STACK`` in every process of the stack."""
    directory: str
    status: str = "starting"
    """``starting``, then ``up`` once every service answers."""
    components: list[Component] = field(default_factory=list)
    s3_endpoint: str = ""
    buckets: list[str] = field(default_factory=list)
    ray_address: str = ""
    """The GCS (``ray.init(address=...)``, ``ray status --address``)."""
    jobs_api: str = ""
    """The dashboard and Jobs API (``--ray-address``, ``ray job submit --address``)."""
    nodes: int = 0
    """Ray nodes expected alive: the head and the workers."""
    env_file: str = ""
    token_file: str = ""
    credentials_file: str = ""
    """The 0600 file with the S3 credentials, or empty when they come from the environment."""

    def save(self) -> None:
        """Write ``stack.json`` atomically (a reader sees the old or the new one, whole)."""
        path = Path(self.directory) / STATE_FILE
        tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, directory: Path) -> StackState | None:
        """The stack recorded in ``directory``, or None where there is none.

        Raises:
            StackError: The file is there but not a stack's.
        """
        path = directory / STATE_FILE
        try:
            data = json.loads(path.read_text())
            data["components"] = [Component(**c) for c in data.get("components", [])]
            return cls(**data)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as exc:
            raise StackError(f"{path} is not a stack state file ({exc}); remove it") from None

    def supervisor(self) -> int:
        """The pid of ``serve`` (-1 where unknown)."""
        return next((c.pid for c in self.components if c.name == "stack"), -1)


@dataclass(frozen=True)
class StackProcess:
    """A live process (``/proc/PID/stat``)."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    start: int


def _read_stat(pid: int) -> StackProcess | None:
    """A live process, or None where it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            # "pid (comm) state ppid pgrp session ... starttime(22nd)": comm may hold spaces.
            fields = stat_file.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] in ("Z", "X"):
        return None
    return StackProcess(pid, int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]))


def _marked(pid: int, mark: bytes) -> bool:
    """Whether the environment ``pid`` started with holds ``mark`` (``NAME=value``)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as env_file:
            return mark in env_file.read().split(b"\0")
    except OSError:  # gone, or another user's
        return False


def processes(state: StackState) -> list[StackProcess]:
    """Every live process of a stack (zombies and this process excluded), found three ways.

    - Sessions: each component leads a session, and everything it starts stays in it unless
      it calls ``setsid``. A session is the component's while its leader runs with the
      recorded start time, or after the leader is gone (its id is not reused while members
      remain).
    - The mark: ``FCNPIPE_LOCAL_STACK=<id>`` in the environment a process started with
      (Ray job drivers run in sessions of their own; Ray workers, which rewrite that memory
      for their ``ray::`` titles, are in their node's session).
    - The components themselves, by pid and start time (a foreground ``serve`` leads none).
    - Descent: any child of a process found so far.

    Args:
        state: The stack (its id and components).
    """
    table: dict[int, StackProcess] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _read_stat(int(entry.name))
            if stat is not None:
                table[stat.pid] = stat
    sessions = set()
    for component in state.components:
        leader = table.get(component.pid)
        if component.leader and (leader is None or leader.start == component.start):
            sessions.add(component.pid)
    mark = f"{MARKER}={state.id}".encode()
    ours = {p.pid for p in table.values() if p.sid in sessions or _marked(p.pid, mark)}
    # A component that does not lead a session (``serve`` run in the foreground) is still
    # itself, while it runs with its recorded start time.
    ours |= {c.pid for c in state.components if c.pid in table and table[c.pid].start == c.start}
    children: dict[int, list[int]] = {}
    for process in table.values():
        children.setdefault(process.ppid, []).append(process.pid)
    todo = list(ours)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in ours:
                ours.add(child)
                todo.append(child)
    ours.discard(os.getpid())
    return [table[pid] for pid in sorted(ours)]


def _wait_until(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.2) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def _signal_stack(state: StackState, signum: int) -> None:
    """Send ``signum`` to the process group of each component that leads one and still has
    members of the stack, then to every process of the stack one by one."""
    live = processes(state)
    groups = {c.pid for c in state.components if c.leader} & {p.pgid for p in live}
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signum)
    for process in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(process.pid, signum)


def stop_stack(state: StackState, grace_s: float = 60.0) -> int:
    """Stop every process of a stack and return how many there were (0: none ran).

    SIGTERM to ``serve`` first (it stops the workers, the head, then S3), then SIGTERM to
    what is left, then SIGKILL.

    Args:
        state: The stack.
        grace_s: How long ``serve`` may take to stop its services.

    Raises:
        StackError: A process survived SIGKILL.
    """
    seen = {p.pid for p in processes(state)}
    if not seen:
        return 0

    def gone(pids: set[int] | None = None) -> Callable[[], bool]:
        def check() -> bool:
            live = {p.pid for p in processes(state)}
            seen.update(live)
            return not (live & pids if pids is not None else live)

        return check

    supervisor = state.supervisor()
    if supervisor in seen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(supervisor, signal.SIGTERM)
        _wait_until(gone({supervisor}), grace_s)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        if gone()():
            return len(seen)
        _signal_stack(state, signum)
        _wait_until(gone(), 10.0)
    left = [p.pid for p in processes(state)]
    if left:
        raise StackError(f"stack in {state.directory}: pids {left} survived SIGKILL")
    return len(seen)


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600, also where it existed with a wider mode)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(text)


def _credentials(directory: Path) -> tuple[str, str, Path | None]:
    """The S3 access key and secret, and the 0600 file holding them (None: from the
    environment, and no file holds them)."""
    key = os.environ.get("AWS_ACCESS_KEY_ID", "")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    path = directory / CREDENTIALS_FILE
    if key and secret:
        path.unlink(missing_ok=True)  # a file from an earlier stack would mislead
        return key, secret, None
    key, secret = "AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    _write_private(
        path,
        f"# S3 credentials of the local stack in {directory} (sourced by {ENV_FILE})\n"
        f"export AWS_ACCESS_KEY_ID={shlex.quote(key)}\n"
        f"export AWS_SECRET_ACCESS_KEY={shlex.quote(secret)}\n",
    )
    return key, secret, path


def _env_script(state: StackState, region: str) -> str:
    """The text of ``env.sh``: variables for a client of the stack, secrets by reference."""
    q = shlex.quote
    lines = [
        f"# The local stack in {state.directory} (python -m infra.local.stack): source this file.",
        f"export AWS_ENDPOINT_URL={q(state.s3_endpoint)}",
        f"export AWS_REGION={q(region)}",
    ]
    if state.credentials_file:
        lines += [
            "unset AWS_SESSION_TOKEN AWS_SECURITY_TOKEN  # not for these credentials",
            f". {q(state.credentials_file)}  # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY",
        ]
    else:
        lines.append("# AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY: the ones `up` ran with")
    lines += [
        "unset RAY_AUTH_TOKEN  # it would win over the token file",
        "export RAY_AUTH_MODE=token",
        f"export RAY_AUTH_TOKEN_PATH={q(state.token_file)}",
        f"# Jobs API: --ray-address {state.jobs_api} (ray job submit --address ...)",
        f"# GCS: {state.ray_address} (ray status --address ...)",
    ]
    return "\n".join(lines) + "\n"


def _get_json(url: str, token: str | None, timeout_s: float = 5.0) -> object:
    """GET ``url`` (with the bearer token where given) and parse the JSON answer."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.load(response)


def alive_nodes(jobs_api: str, token: str) -> int:
    """How many nodes Ray's state API (on the dashboard, token auth) reports alive."""
    answer = _get_json(f"{jobs_api}/api/v0/nodes?limit=1000&detail=false", token)
    assert isinstance(answer, dict)
    nodes = answer["data"]["result"]["result"]
    return sum(1 for node in nodes if node.get("state") == "ALIVE")


def _first_line(exc: BaseException) -> str:
    """One line for an error whose message may carry a log: its first line, and where that
    only introduces the log (ends with ':'), the log's last line too."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} ... {lines[-1]}"
    return lines[0]


def _check_can_start(options: StackOptions) -> None:
    """Refuse a second stack in the same directory, ports that are taken, and half the S3
    credentials.

    A ``stack.json`` whose processes are all gone is stale and removed.

    Raises:
        StackError: What is in the way.
    """
    state = StackState.load(options.directory)
    if state is not None:
        if processes(state):
            raise StackError(
                f"a stack is already up in {options.directory}; stop it first "
                f"(python -m infra.local.stack down --dir {options.directory})"
            )
        (options.directory / STATE_FILE).unlink(missing_ok=True)
    for port, what in ((options.dashboard_port, "Ray dashboard"), (options.s3_port, "S3")):
        if port_in_use(port):
            raise StackError(f"port {port} ({what}) is in use on {HOST}")
    if bool(os.environ.get("AWS_ACCESS_KEY_ID")) != bool(os.environ.get("AWS_SECRET_ACCESS_KEY")):
        raise StackError(
            "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither (then `up` makes "
            "credentials up)"
        )


@contextlib.contextmanager
def _terminate_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP end the block as Ctrl-C does; from then on all three are ignored,
    so that a second one cannot cut the services' clean-up short."""

    def handler(signum: int, frame: FrameType | None) -> None:
        for name in _STOP_SIGNALS:
            signal.signal(name, signal.SIG_IGN)
        raise SystemExit(0)

    for name in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(name, handler)
    try:
        yield
    finally:
        for name in _STOP_SIGNALS:
            signal.signal(name, signal.SIG_IGN)


def _restore_handlers(handlers: dict[signal.Signals, Any]) -> None:
    for name, handler in handlers.items():
        if handler is not None:  # None: set outside Python, cannot be put back
            signal.signal(name, handler)


def serve(options: StackOptions, stack_id: str | None = None) -> int:
    """Run the stack in this process's foreground until Ctrl-C, SIGTERM or SIGHUP.

    Args:
        options: What to start.
        stack_id: The stack's id (``up`` passes its own through ``FCNPIPE_LOCAL_STACK``).

    Returns:
        The exit status: 0 after a clean stop.

    Raises:
        StackError: It could not start (what it started is stopped again).
    """
    directory = options.directory
    _check_can_start(options)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    stack_id = stack_id or secrets.token_hex(8)
    # Inherited by weed, the Ray nodes and everything they start: how `down` finds them all.
    os.environ[MARKER] = stack_id
    state = StackState(id=stack_id, directory=str(directory), nodes=1 + options.workers)
    state.components.append(Component.of("stack", os.getpid()))
    handlers = {name: signal.getsignal(name) for name in _STOP_SIGNALS}

    # Exits in reverse: the signals are ignored, the services stop, the handlers come back.
    with contextlib.ExitStack() as cleanup, _terminate_on_signals():
        cleanup.callback(_restore_handlers, handlers)
        cleanup.callback(_forget, state)
        state.save()
        token = os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)
        token_path = directory / TOKEN_FILE
        _write_private(token_path, token + "\n")
        state.token_file = str(token_path)
        access_key, secret_key, credentials_path = _credentials(directory)
        if credentials_path is not None:  # a session token would be sent with the new key
            for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
                os.environ.pop(name, None)
        state.credentials_file = str(credentials_path or "")

        s3 = SeaweedS3(
            directory / "s3",
            access_key=access_key,
            secret_key=secret_key,
            s3_port=options.s3_port,
            region=options.region,
        )
        cleanup.callback(s3.stop)
        s3.start()
        state.components.append(Component.of("s3", s3.pid or -1))
        state.s3_endpoint, state.buckets = s3.endpoint, list(options.buckets)
        state.save()
        for bucket in options.buckets:
            s3.create_bucket(bucket)

        node_env = {
            # A job's entrypoint (`fcnpipe ...`) resolves to this virtualenv, as on an image.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "AWS_ENDPOINT_URL": s3.endpoint,
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_REGION": options.region,
        }
        mib = options.object_store_mb
        cluster = LocalRayCluster(
            directory / "ray",
            head_cpus=options.head_cpus,
            token=token,
            env=node_env,
            dashboard_port=options.dashboard_port,
            object_store_memory=mib * 2**20 if mib is not None else None,
        )
        cleanup.callback(cluster.stop)
        cluster.start()
        for _ in range(options.workers):
            cluster.add_node(num_cpus=options.worker_cpus)
        names = ["ray-head"] + [f"ray-worker-{i}" for i in range(1, options.workers + 1)]
        state.components += [
            Component.of(n, p.pid) for n, p in zip(names, cluster.nodes, strict=True)
        ]
        state.ray_address, state.jobs_api = cluster.address, cluster.dashboard_url
        state.save()

        _wait_for_nodes(cluster, state.nodes)
        _get_json(f"{cluster.dashboard_url}/api/jobs/", token)  # the Jobs API, with the token
        env_path = directory / ENV_FILE
        env_path.write_text(_env_script(state, options.region))
        state.env_file = str(env_path)
        state.status = "up"
        state.save()
        print(f"stack up in {directory} (id {stack_id})", flush=True)
        _watch(s3, cluster, names)
    return 0


def _wait_for_nodes(cluster: LocalRayCluster, count: int, timeout_s: float = 120.0) -> None:
    """Wait until the state API reports ``count`` nodes alive.

    Raises:
        StackError: A node exited, or they were not all alive in time.
    """
    deadline = time.monotonic() + timeout_s
    alive = 0
    while True:
        for index, node in enumerate(cluster.nodes):
            if node.poll() is not None:
                name = "head" if index == 0 else f"node{index}"
                tail = cluster.log_tail(name).strip().splitlines()[-1:] or ["(empty log)"]
                raise StackError(f"ray {name} exited at start: {tail[0]}")
        with contextlib.suppress(OSError, ValueError, KeyError):
            alive = alive_nodes(cluster.dashboard_url, cluster.token)
            if alive >= count:
                return
        if time.monotonic() > deadline:
            raise StackError(f"{alive} of {count} Ray nodes alive after {timeout_s:.0f} s")
        time.sleep(0.5)


def _watch(s3: SeaweedS3, cluster: LocalRayCluster, node_names: list[str]) -> None:
    """Sleep until a signal; say in the log when a service exits on its own."""
    exited: set[str] = set()
    while True:
        running = {"s3": s3.is_running()}
        running.update(
            (n, p.poll() is None) for n, p in zip(node_names, cluster.nodes, strict=True)
        )
        for name in sorted(n for n, alive in running.items() if not alive and n not in exited):
            exited.add(name)
            print(f"{name} exited; `status` shows what still runs", flush=True)
        time.sleep(1.0)


def _forget(state: StackState) -> None:
    """Remove ``stack.json`` if it is still this stack's (a stopped stack has none)."""
    path = Path(state.directory) / STATE_FILE
    with contextlib.suppress(StackError):
        current = StackState.load(Path(state.directory))
        if current is not None and current.id == state.id:
            path.unlink(missing_ok=True)


def up(options: StackOptions, timeout_s: float = 300.0) -> StackState:
    """Start ``serve`` detached and wait until the stack is up.

    Args:
        options: What to start.
        timeout_s: How long to wait before giving up (and stopping what started).

    Raises:
        StackError: It did not come up (the message names what and why; the rest is in
            ``DIR/stack.log``).
    """
    directory = options.directory
    _check_can_start(options)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    stack_id = secrets.token_hex(8)
    log_path = directory / LOG_FILE
    with log_path.open("ab") as log:
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} up\n".encode())
        log.flush()
        # A new session: the stack survives this command, and the terminal's Ctrl-C and
        # hang-up never reach it. No pipe of ours is inherited, so callers do not wait on it.
        process = subprocess.Popen(
            [sys.executable, "-m", "infra.local.stack", "serve", *options.argv()],
            env={**os.environ, MARKER: stack_id},
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    placeholder = StackState(id=stack_id, directory=str(directory))
    placeholder.components.append(Component.of("stack", process.pid))
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)  # `kill` as Ctrl-C
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(StackError):
                state = StackState.load(directory)
                if state is not None and state.id == stack_id and state.status == "up":
                    return state
            if process.poll() is not None:
                raise StackError(f"stack in {directory} did not start: {_serve_error(log_path)}")
            if time.monotonic() > deadline:
                raise StackError(
                    f"stack in {directory} not up after {timeout_s:.0f} s (log {log_path})"
                )
            time.sleep(0.25)
    except BaseException:
        # Also on Ctrl-C: nothing of a stack that never came up is left running.
        with contextlib.suppress(StackError):
            current = StackState.load(directory)
            stop_stack(current if current is not None and current.id == stack_id else placeholder)
            _forget(placeholder)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _serve_error(log_path: Path) -> str:
    """The error line ``serve`` wrote last, or where to look."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in reversed(lines):
        if line.startswith(_ERROR_PREFIX):
            return line.removeprefix(_ERROR_PREFIX)
    return f"serve exited; see {log_path}"


def down(directory: Path) -> str:
    """Stop the stack recorded in ``directory``; return what was done, in one line.

    Raises:
        StackError: A process survived SIGKILL (``stack.json`` is kept, to retry).
    """
    state = StackState.load(directory)
    if state is None:
        return f"no stack in {directory}: nothing to stop"
    count = stop_stack(state)
    (directory / STATE_FILE).unlink(missing_ok=True)
    if count == 0:
        return f"the stack in {directory} was not running; removed its {STATE_FILE}"
    return f"stopped the stack in {directory} ({count} processes)"


def status(directory: Path) -> tuple[bool, str]:
    """Whether the stack in ``directory`` runs whole, and a report of what runs."""
    state = StackState.load(directory)
    if state is None:
        return False, f"no stack in {directory}"
    live = processes(state)
    live_pids = {p.pid for p in live}
    healthy = state.status == "up"
    lines = []
    for component in state.components:
        running = component.pid in live_pids
        healthy &= running
        lines.append(
            f"  {component.name:<13} pid {component.pid:<8} {'running' if running else 'gone'}"
        )
    if state.s3_endpoint:
        answers = _answers(state.s3_endpoint)
        healthy &= answers
        lines.append(f"  S3        {state.s3_endpoint}  {'answers' if answers else 'no answer'}")
    if state.jobs_api:
        try:
            token = Path(state.token_file).read_text().strip()
            nodes = alive_nodes(state.jobs_api, token)
            jobs = f"answers with the token; {nodes} of {state.nodes} nodes alive"
            healthy &= nodes == state.nodes
        except (OSError, ValueError, KeyError) as exc:
            jobs, healthy = f"no answer ({_first_line(exc)})", False
        lines.append(f"  Jobs API  {state.jobs_api}  {jobs}")
        lines.append(f"  Ray GCS   {state.ray_address}")
    if state.env_file:
        lines.append(f"  source {state.env_file}")
    if healthy:
        headline = "up"
    elif not live:
        headline = "not running (down --dir cleans up)"
    elif state.status != "up":
        headline = "starting"
    else:
        headline = "partly running (down, then up again)"
    lines.insert(0, f"stack in {directory}: {headline}; {len(live)} processes")
    return healthy, "\n".join(lines)


def _answers(url: str) -> bool:
    """Whether an HTTP server answers at ``url`` at all (an error status counts)."""
    try:
        with urllib.request.urlopen(url, timeout=3):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infra.local.stack",
        description="Local S3 (SeaweedFS) and a multi-node Ray cluster on 127.0.0.1.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "up": "start the stack in the background and wait until it answers",
        "serve": "run the stack in the foreground until Ctrl-C or SIGTERM",
        "down": "stop the stack (every process of it, nothing else)",
        "status": "say what runs (exit 0 only if all of it does)",
    }
    for name, help_text in commands.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--dir", type=Path, required=True, help="the stack's directory")
        if name not in ("up", "serve"):
            continue
        defaults = StackOptions(directory=Path("/"))
        command.add_argument("--workers", type=int, default=defaults.workers)
        command.add_argument("--head-cpus", type=int, default=defaults.head_cpus)
        command.add_argument("--worker-cpus", type=int, default=defaults.worker_cpus)
        command.add_argument("--dashboard-port", type=int, default=defaults.dashboard_port)
        command.add_argument("--s3-port", type=int, default=defaults.s3_port)
        command.add_argument(
            "--bucket", action="append", help=f"repeatable (default: {defaults.buckets[0]})"
        )
        command.add_argument("--region", default=defaults.region)
        command.add_argument("--object-store-mb", type=int, default=None)
        if name == "up":
            command.add_argument("--timeout", type=float, default=300.0, help="seconds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; errors are one line on stderr and exit 1."""
    args = _parser().parse_args(argv)
    directory = Path(args.dir).absolute()
    try:
        if args.command == "down":
            print(down(directory))
            return 0
        if args.command == "status":
            healthy, report = status(directory)
            print(report)
            return 0 if healthy else 1
        try:
            options = StackOptions(
                directory=directory,
                workers=args.workers,
                head_cpus=args.head_cpus,
                worker_cpus=args.worker_cpus,
                dashboard_port=args.dashboard_port,
                s3_port=args.s3_port,
                buckets=tuple(args.bucket or StackOptions.buckets),
                region=args.region,
                object_store_mb=args.object_store_mb,
            )
        except ValueError as exc:
            raise StackError(str(exc)) from None
        if args.command == "serve":
            try:
                return serve(options, os.environ.get(MARKER))
            except KeyboardInterrupt:
                return 0
        state = up(options, timeout_s=args.timeout)
    except KeyboardInterrupt:
        done = "; stopped what had started" if args.command == "up" else ""
        print(f"{_ERROR_PREFIX}interrupted{done}", file=sys.stderr)
        return 130
    except StackError as exc:
        print(f"{_ERROR_PREFIX}{exc}", file=sys.stderr)
        return 1
    except (RuntimeError, OSError) as exc:  # a service's own failure, with its log
        if args.command == "serve":  # into stack.log, whole, before the one line `up` shows
            print(exc, file=sys.stderr)
        print(f"{_ERROR_PREFIX}{_first_line(exc)}", file=sys.stderr)
        return 1
    print(
        f"stack up in {directory}: {state.nodes} Ray nodes\n"
        f"  S3        {state.s3_endpoint}  (buckets: {', '.join(state.buckets)})\n"
        f"  Jobs API  {state.jobs_api}  (dashboard; token auth)\n"
        f"  Ray GCS   {state.ray_address}\n"
        f"  source {state.env_file}\n"
        f"  stop: python -m infra.local.stack down --dir {directory}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
