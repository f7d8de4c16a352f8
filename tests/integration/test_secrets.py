"""Credentials never leak: run real jobs against the S3 server and look for the secret
in everything they print, write to the bucket, write locally, and log through Ray."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from infra.local.seaweedfs import SeaweedS3
from pipeline.storage import list_files, read_bytes
from tests.cli import fcnpipe

pytestmark = pytest.mark.integration


def test_secret_appears_in_no_output_object_file_or_ray_log(
    s3_env: SeaweedS3, bucket: str, tmp_path: Path
) -> None:
    secret = s3_env.secret_key
    wrong_secret = "wrong-" + secret[::-1]
    root = f"s3://{bucket}/shapes"
    local = tmp_path / "local-shapes"
    # Ray's session directory (logs of the driver, raylet and every worker) under a short
    # path: Ray's unix sockets live there and their paths are limited to ~100 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="fcnray-", dir="/tmp"))
    try:
        ray_env = {"RAY_TMPDIR": str(ray_tmp)}
        runs = [
            fcnpipe("dataset", "synth", root, "--num-images", "6", "--size", "32"),
            fcnpipe("dataset", "index", root),
            fcnpipe("dataset", "info", root),
            fcnpipe("dataset", "synth", str(local), "--num-images", "6", "--size", "32"),
            fcnpipe(
                "bench", "read", "--local-uri", str(local), "--s3-uri", root,
                "--num-images", "6", env=ray_env,
            ),
            # Failure paths print messages too: a missing bucket and a wrong secret.
            fcnpipe("dataset", "info", f"s3://{bucket}-missing/shapes"),
            fcnpipe("dataset", "info", root, env={"AWS_SECRET_ACCESS_KEY": wrong_secret}),
            # The tables' connection properties: the catalog's credential stays in the env.
            fcnpipe(
                "tables", "info", f"s3://{bucket}/out", "--json",
                env={"PYICEBERG_CATALOG__FCNPIPE__CREDENTIAL": secret},
            ),
        ]  # fmt: skip
        assert [r.returncode for r in runs] == [0, 0, 0, 0, 0, 2, 2, 0], [r.stderr for r in runs]
        assert "s3 / local" in runs[4].stdout  # the Ray job really ran
        assert "access denied" in runs[6].stderr and bucket in runs[6].stderr
        assert '"s3.endpoint"' in runs[7].stdout
        for failed in runs[5:7]:  # one line naming the bucket, no traceback
            lines = [line for line in failed.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and bucket in lines[0], failed.stderr
        for run in runs:
            for text in (run.stdout, run.stderr):
                assert secret not in text and wrong_secret not in text

        written = list_files(root)
        assert len(written) > 12  # images, masks, split files, classes, manifest
        for info in written:
            assert secret.encode() not in read_bytes(info.uri), info.uri
        for path in local.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path

        ray_files = [p for p in ray_tmp.rglob("*") if p.is_file() and not p.is_symlink()]
        assert any(p.suffix in {".log", ".out", ".err"} for p in ray_files)
        for path in ray_files:
            assert secret.encode() not in path.read_bytes(), path
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
