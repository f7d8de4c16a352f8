"""Fixtures for integration tests: a real S3 server (SeaweedFS) on 127.0.0.1.

- ``s3_server`` (session): one ``weed mini`` with random credentials, stopped at the end.
- ``s3_env``: the standard AWS variables pointing at it, for one test.
- ``bucket``: a fresh, empty bucket for one test.
- ``storage_root``: a root URI on each backend in turn (``file`` and ``s3``), so a test
  using it runs on both.
- ``ray_local`` (session): one local Ray with 2 CPUs whose workers can reach the S3 server.
- ``prefect_server`` (session): one ``prefect server start`` (SQLite, own home) on 127.0.0.1.
- ``prefect_api``: this process's Prefect client settings pointed at it, for one test.
- ``ray_cluster`` (module): a ``ray start`` head (token auth, Jobs API) on 127.0.0.1.
"""

from __future__ import annotations

import os
import secrets
import shutil
import string
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from infra.local.prefect_server import PrefectServer
from infra.local.ray_cluster import LocalRayCluster
from infra.local.seaweedfs import SeaweedS3

S3_REGION = "us-east-1"


def _random_access_key() -> str:
    alphabet = string.ascii_uppercase + string.digits
    return "AKIA" + "".join(secrets.choice(alphabet) for _ in range(16))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 server on 127.0.0.1 with random credentials, for the whole session.

    Yields the server: ``endpoint``, ``access_key``, ``secret_key``, ``create_bucket()``,
    ``restart()``.
    """
    server = SeaweedS3(
        tmp_path_factory.mktemp("seaweedfs"),
        access_key=_random_access_key(),
        secret_key=secrets.token_urlsafe(30),
        region=S3_REGION,
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> SeaweedS3:
    """Point the standard AWS variables at ``s3_server`` for one test (and nothing else)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_REGION", S3_REGION)
    # Nothing from the developer's own AWS setup may leak in.
    for name in (
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ENDPOINT_URL_S3",
        "AWS_DEFAULT_REGION",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/fcnpipe-test-aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/fcnpipe-test-aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return s3_server


@pytest.fixture
def bucket(s3_server: SeaweedS3) -> str:
    """A fresh bucket with a unique name."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture(params=["file", "s3"])
def storage_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A root URI on each backend: a temporary directory, then ``s3://<fresh bucket>/prefix``.

    For ``s3`` the AWS variables point at the test server (``s3_env``).
    """
    if request.param == "file":
        return str(tmp_path / "root")
    request.getfixturevalue("s3_env")
    name: str = request.getfixturevalue("bucket")
    return f"s3://{name}/prefix"


@pytest.fixture(scope="session")
def ray_local(s3_server: SeaweedS3) -> Iterator[None]:
    """A local Ray (2 CPUs, dashboard on 127.0.0.1) whose workers can reach ``s3_server``.

    Ray's workers inherit the environment of ``ray.init()``; credentials never go through
    ``runtime_env``. Tests still take ``s3_env`` for their own (driver-side) S3 calls.
    """
    from pipeline.cluster import ensure_ray

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
        mp.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
        mp.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
        mp.setenv("AWS_REGION", S3_REGION)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        ensure_ray(num_cpus=2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real Prefect server (``prefect server start``, SQLite) with its own home."""
    with PrefectServer(tmp_path_factory.mktemp("prefect")) as server:
        yield server


@pytest.fixture
def prefect_api(prefect_server: PrefectServer) -> Iterator[PrefectServer]:
    """Flows called in this test report to ``prefect_server`` (not an ephemeral one).

    Prefect reads its settings once at import, so the test changes them through
    ``temporary_settings``, not the environment.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        yield prefect_server


@pytest.fixture(scope="session")
def ray_node_env(s3_server: SeaweedS3) -> dict[str, str]:
    """Environment of ``ray start`` nodes: this virtualenv's ``python`` and ``fcnpipe`` first
    on the PATH (as a cluster image has them), ``s3_server``'s endpoint and credentials, and
    one torch thread per process."""
    return {
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}",
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_REGION": S3_REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(scope="module")
def ray_cluster(ray_node_env: dict[str, str]) -> Iterator[LocalRayCluster]:
    """A one-node ``ray start`` cluster with 2 CPUs, token auth on, reachable by Jobs API,
    shared by the tests of a module (its start and stop cost about 13 s): a test looks only
    at the jobs it submitted.

    Tests add worker nodes with ``add_node``; all of them get ``ray_node_env``.
    """
    # Short: Ray's Unix socket paths under it must stay below 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    try:
        with LocalRayCluster(temp_dir, head_cpus=2, env=ray_node_env) as cluster:
            yield cluster
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
