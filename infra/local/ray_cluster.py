"""A real multi-process Ray cluster on this machine: ``ray start`` head and workers, token auth.

Usage (stays in the foreground until Ctrl-C; prints the addresses when it is ready)::

    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(openssl rand -hex 32)
    .venv/bin/python -m infra.local.ray_cluster --head-cpus 2

then, in another shell with the same two variables set::

    fcnpipe flow train DATASET --output OUT --ray-address http://127.0.0.1:8265

To run it in the background with the S3 server, and stop it later, use
``python -m infra.local.stack up --dir DIR`` / ``down --dir DIR``.

Each node is one ``ray start --block`` process in its own process group, so stopping a node
kills exactly its processes (``ray stop`` would kill every Ray on the machine, including other
clusters). Every port is chosen free, and the nodes and the dashboard (Jobs API) use
127.0.0.1; Ray still opens some listeners on all interfaces (the GCS and raylet gRPC ports,
the per-node dashboard and runtime-env agents), which token auth guards. Ray 2.60 turns
token auth on for ``ray start`` clusters: the token comes from ``RAY_AUTH_TOKEN`` (or is made
up), is handed to the nodes through their environment only, and every Jobs API request must
carry it.

In Python (the integration tests do this)::

    with LocalRayCluster(Path(tempfile.mkdtemp(prefix="ray", dir="/tmp")), head_cpus=2) as c:
        c.add_node(num_cpus=2)
        print(c.dashboard_url, c.env())
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from infra.local._net import HOST, free_port
from infra.local._process import LocalService, http_ok, launch, read_tail, stop_group

__all__ = ["LocalRayCluster"]


class LocalRayCluster(LocalService):
    """A Ray head (and optional worker nodes) started with ``ray start`` on 127.0.0.1."""

    def __init__(
        self,
        temp_dir: Path,
        *,
        head_cpus: int = 1,
        token: str | None = None,
        env: dict[str, str] | None = None,
        dashboard_port: int | None = None,
        object_store_memory: int | None = None,
    ) -> None:
        """Describe the cluster; :meth:`start` (or ``with``) starts the head.

        Args:
            temp_dir: Ray's temp dir (sessions, logs, sockets): keep the path short, Unix
                socket paths under it must stay below 107 bytes.
            head_cpus: CPUs the head node offers to tasks.
            token: The auth token (default: ``RAY_AUTH_TOKEN`` if set, else a new random one).
            env: Extra variables for every node (e.g. S3 endpoint and credentials).
            dashboard_port: Port of the dashboard and Jobs API (default: a free one).
            object_store_memory: Bytes of object store per node (default: Ray's, 30% of
                the machine's memory per node, which several nodes on one machine overcommit).
        """
        self.temp_dir = temp_dir
        self.head_cpus = head_cpus
        self.token = token or os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)
        self.extra_env = dict(env or {})
        self.gcs_port = free_port()
        self.dashboard_port = dashboard_port or free_port()
        self.object_store_memory = object_store_memory
        self._nodes: list[subprocess.Popen[bytes]] = []

    @property
    def address(self) -> str:
        """The GCS address (``ray.init(address=...)``, ``ray start --address``)."""
        return f"{HOST}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard and Jobs API (``--ray-address``)."""
        return f"http://{HOST}:{self.dashboard_port}"

    @property
    def nodes(self) -> list[subprocess.Popen[bytes]]:
        """The ``ray start`` process of every node since the last :meth:`stop` (killed ones
        too), head first; each leads its own process group (its raylet, workers, GCS)."""
        return list(self._nodes)

    def env(self) -> dict[str, str]:
        """Variables a client (Jobs API, ``ray.init``) needs: the auth mode and token."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def _node_env(self) -> dict[str, str]:
        return {**os.environ, **self.extra_env, **self.env(), "RAY_USAGE_STATS_ENABLED": "0"}

    def _ray(self) -> str:
        return str(Path(sys.executable).parent / "ray")

    @staticmethod
    def _node_ports() -> list[str]:
        """Free ports for every fixed-default listener of a node (the dashboard agent's
        52365, the Ray Client server's 10001...), so this cluster never collides with another
        Ray on the machine (a test's embedded one, a second cluster)."""
        flags = (
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
            "--metrics-export-port",
        )
        return [f"{flag}={free_port()}" for flag in flags]

    def _launch(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        if self.object_store_memory is not None:
            args = [*args, f"--object-store-memory={self.object_store_memory}"]
        process = launch(
            [self._ray(), "start", "--block", "--disable-usage-stats", *self._node_ports(), *args],
            self.temp_dir / f"{name}.log",
            env=self._node_env(),
        )
        self._nodes.append(process)
        return process

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the head and wait for its Jobs API to answer.

        Raises:
            RuntimeError: The head exited or did not answer in time (with its log).
        """
        head = self._launch(
            [
                "--head",
                f"--node-ip-address={HOST}",
                f"--port={self.gcs_port}",
                f"--num-cpus={self.head_cpus}",
                "--include-dashboard=true",
                f"--dashboard-host={HOST}",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
                f"--temp-dir={self.temp_dir}",
            ],
            "head",
        )
        request = urllib.request.Request(
            f"{self.dashboard_url}/api/version",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        self._wait_ready(
            head,
            lambda: http_ok(request),
            timeout_s=timeout_s,
            poll_s=0.5,
            exited=lambda code: f"ray head exited at start:\n{self.log_tail('head')}",
            timed_out=lambda error: (
                f"ray head not ready after {timeout_s:.0f} s:\n{self.log_tail('head')}"
            ),
        )

    def add_node(self, num_cpus: int = 1, resources: str | None = None) -> subprocess.Popen[bytes]:
        """Start a worker node that joins the head (returns without waiting for it).

        Args:
            num_cpus: CPUs it offers.
            resources: JSON of custom resources, e.g. ``'{"worker": 1}'``.
        """
        args = [f"--address={self.address}", f"--node-ip-address={HOST}", f"--num-cpus={num_cpus}"]
        if resources:
            args.append(f"--resources={resources}")
        return self._launch(args, f"node{len(self._nodes)}")

    def kill_node(self, node: subprocess.Popen[bytes]) -> None:
        """Kill one node's processes at once (SIGKILL), as a lost machine would."""
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop every node, workers first: SIGTERM to its process group, then SIGKILL to
        whatever of the group is left (raylet, GCS, workers), even if the leader exited."""
        nodes, self._nodes = self._nodes, []
        for node in reversed(nodes):
            stop_group(node, timeout_s)

    def log_tail(self, name: str = "head", chars: int = 4000) -> str:
        """The end of a node's ``ray start`` output."""
        return read_tail(self.temp_dir / f"{name}.log", chars)


def main(argv: list[str] | None = None) -> int:
    """Run a head (and workers) in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-cpus", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="worker nodes to add")
    parser.add_argument("--worker-cpus", type=int, default=1)
    parser.add_argument("--temp-dir", type=Path, default=Path("/tmp/fcnpipe-ray"))
    parser.add_argument("--dashboard-port", type=int, default=8265, help="Jobs API port")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the nodes on `kill` too
    with LocalRayCluster(
        args.temp_dir, head_cpus=args.head_cpus, dashboard_port=args.dashboard_port
    ) as cluster:
        for _ in range(args.workers):
            cluster.add_node(args.worker_cpus)
        print(f"ray address: {cluster.address}\njobs api: {cluster.dashboard_url}", flush=True)
        if "RAY_AUTH_TOKEN" not in os.environ:
            print(
                f"token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from {cluster.temp_dir}/token",
                flush=True,
            )
            fd = os.open(cluster.temp_dir / "token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as token_file:
                token_file.write(cluster.token)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
