"""pipeline.storage without a server: URIs and local paths, endpoints, and the retry policy
(on a stand-in filesystem that fails as S3 does). The same module against local disk and a
real S3 server: ``tests/integration/test_storage.py``."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from s3fs.errors import translate_boto_error

from pipeline.storage import (
    Location,
    RetryPolicy,
    StorageError,
    StorageOptions,
    StorageUnavailable,
    join,
    read_bytes,
    resolve,
    to_local_path,
)
from tests.leaks import WRONG_SECRET, assert_no_secret

pytestmark = pytest.mark.unit

STORAGE_LOGGER = "pipeline.storage"


def _retries(caplog: pytest.LogCaptureFixture) -> int:
    """How many retries pipeline.storage logged."""
    return sum(
        1 for r in caplog.records if r.name == STORAGE_LOGGER and "retrying" in r.getMessage()
    )


def test_to_local_path_maps_keys_under_destination(tmp_path: Path) -> None:
    assert to_local_path(tmp_path, "a/b.png") == tmp_path / "a" / "b.png"
    assert to_local_path(tmp_path, "./a//b.png") == tmp_path / "a" / "b.png"
    assert to_local_path(str(tmp_path), "x..y/z") == tmp_path / "x..y" / "z"


@pytest.mark.parametrize("key", ["../x", "a/../../x", "a/..", "..", "/etc/passwd", "//x", "", "."])
def test_to_local_path_rejects_escaping_keys(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="object key") as info:
        to_local_path(tmp_path, key)
    assert repr(key) in str(info.value)


def test_resolve_local_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    plain = resolve("data/x.png")
    assert plain.scheme == "file"
    assert plain.path == str(tmp_path / "data" / "x.png")
    assert plain.uri == plain.path
    url = resolve(f"file://{tmp_path}/data/x.png")
    assert url.path == plain.path
    assert url.bucket is None
    fs, path = url.pyarrow_fs()
    assert fs.type_name == "local"
    assert path == plain.path


def test_resolve_s3_without_server() -> None:
    loc = resolve("s3://bucket/a/b/", StorageOptions(s3_endpoint="http://127.0.0.1:9/"))
    assert (loc.scheme, loc.path, loc.uri, loc.bucket) == (
        "s3",
        "bucket/a/b",
        "s3://bucket/a/b",
        "bucket",
    )
    assert loc.options.s3_endpoint == "http://127.0.0.1:9"
    assert loc.join("c", "d/e.png").uri == "s3://bucket/a/b/c/d/e.png"
    fs, path = loc.pyarrow_fs()
    assert fs.type_name == "s3"
    assert path == "bucket/a/b"


@pytest.mark.parametrize("uri", ["ftp://host/x", "hdfs://nn/x", "s4://b/k"])
def test_unknown_scheme_names_uri_and_supported_schemes(uri: str) -> None:
    with pytest.raises(ValueError) as info:
        resolve(uri)
    message = str(info.value)
    assert uri in message
    for scheme in ("file://", "s3://", "gs://"):
        assert scheme in message


@pytest.mark.parametrize("uri", ["s3://", "s3:///key", "file://host/x"])
def test_malformed_uri_is_rejected(uri: str) -> None:
    with pytest.raises(ValueError, match="URI"):
        resolve(uri)


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_gs_without_gcsfs_is_a_clear_error() -> None:
    with pytest.raises(StorageError, match="gcsfs"):
        resolve("gs://bucket/key")


def test_join() -> None:
    assert join("s3://b/p", "x", "y/z.png") == "s3://b/p/x/y/z.png"
    assert join("s3://b/p/", "x") == "s3://b/p/x"
    assert join("/data", "a") == "/data/a"
    assert join("file:///", "a") == "file:///a"
    with pytest.raises(ValueError, match=r"\.\."):
        join("s3://b/p", "../q")
    with pytest.raises(ValueError, match="absolute"):
        join("s3://b/p", "/etc")


@pytest.mark.parametrize(
    "endpoint", ["ftp://h:1", "http://", "http://h:1/path", "http://h:99999", "h:9000"]
)
def test_bad_endpoint_is_rejected(endpoint: str) -> None:
    with pytest.raises(ValueError, match="s3_endpoint"):
        StorageOptions(s3_endpoint=endpoint)


def test_endpoint_with_user_info_is_rejected_without_echoing_it() -> None:
    with pytest.raises(ValueError, match="s3_endpoint") as info:
        StorageOptions(s3_endpoint=f"http://user:{WRONG_SECRET}@127.0.0.1:9000")
    assert_no_secret(info.value, WRONG_SECRET)


def test_retry_policy_validation() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="initial_delay_s"):
        RetryPolicy(initial_delay_s=5, max_delay_s=1)


class _FlakyFS:
    """Stands in for s3fs: raises the given errors in turn (forever if ``repeat``), then reads."""

    def __init__(self, errors: list[BaseException], repeat: bool = False) -> None:
        self.errors = errors
        self.repeat = repeat
        self.calls = 0

    def cat_file(self, path: str) -> bytes:
        self.calls += 1
        if self.errors:
            raise self.errors[0] if self.repeat else self.errors.pop(0)
        return b"ok"


def _s3_error(code: str, status: int) -> BaseException:
    """A server error as s3fs raises it (translated, the botocore error as its cause)."""
    error = ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )
    translated: BaseException = translate_boto_error(error)
    return translated


def _flaky_location(fs: _FlakyFS, policy: RetryPolicy) -> Location:
    options = StorageOptions(s3_endpoint="http://127.0.0.1:9", retry=policy)
    return replace(resolve("s3://bucket/key", options), fs=fs)


FAST = RetryPolicy(max_attempts=5, initial_delay_s=0.01, max_delay_s=0.02)


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("SlowDown", 503),
        ("ServiceUnavailable", 503),
        ("InternalError", 500),
        ("ThrottlingException", 400),
        ("RequestTimeout", 400),
        ("BadGateway", 502),
    ],
)
def test_throttling_and_server_errors_are_retried(
    code: str, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    fs = _FlakyFS([_s3_error(code, status), _s3_error(code, status)])
    assert read_bytes(_flaky_location(fs, FAST)) == b"ok"
    assert fs.calls == 3
    assert _retries(caplog) == 2


def test_client_errors_are_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    fs = _FlakyFS([_s3_error("InvalidArgument", 400)])
    with pytest.raises(OSError, match="InvalidArgument"):
        read_bytes(_flaky_location(fs, FAST))
    assert fs.calls == 1
    assert _retries(caplog) == 0


def test_retries_stop_at_the_time_budget() -> None:
    policy = RetryPolicy(max_attempts=1000, initial_delay_s=0.01, max_delay_s=0.02, max_total_s=0.2)
    fs = _FlakyFS([_s3_error("SlowDown", 503)], repeat=True)
    with pytest.raises(StorageUnavailable, match="SlowDown"):
        read_bytes(_flaky_location(fs, policy))
    assert 1 < fs.calls < 1000
