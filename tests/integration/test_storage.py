"""pipeline.storage against the local filesystem and a real S3 server (SeaweedFS).

Tests taking ``storage_root`` run once per backend. Every test also checks that the S3
secret key (and the wrong secrets some tests use) appear in no log record and no output.
"""

from __future__ import annotations

import logging
import pickle
import socket
import threading
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra.local.seaweedfs import SeaweedS3
from pipeline.storage import (
    AccessDenied,
    BucketNotFound,
    ObjectTooLarge,
    RetryPolicy,
    StorageError,
    StorageOptions,
    StorageUnavailable,
    delete,
    exists,
    join,
    list_files,
    makedirs,
    read_bytes,
    resolve,
    write_bytes,
)
from tests.leaks import WRONG_SECRET, assert_no_secret

pytestmark = pytest.mark.integration

STORAGE_LOGGER = "pipeline.storage"


def _retries(caplog: pytest.LogCaptureFixture) -> int:
    """How many retries pipeline.storage logged."""
    return sum(
        1 for r in caplog.records if r.name == STORAGE_LOGGER and "retrying" in r.getMessage()
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(autouse=True)
def no_secret_leaks(
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> Iterator[None]:
    """Capture all logging (DEBUG, botocore and s3fs included) and output; check for secrets."""
    caplog.set_level(logging.DEBUG)
    yield
    secrets = [WRONG_SECRET]
    if "s3_server" in request.fixturenames:
        server: SeaweedS3 = request.getfixturevalue("s3_server")
        secrets.append(server.secret_key)
    out, err = capfd.readouterr()
    # caplog.records holds only the current phase; look at every phase so far.
    formatter = logging.Formatter()
    logged = "\n".join(
        formatter.format(record)
        for when in ("setup", "call", "teardown")
        for record in caplog.get_records(when)
    )
    # pytest.fail rather than assert: a failing assert would print the secret itself.
    for secret in secrets:
        for where, text in (("a log record", logged), ("stdout", out), ("stderr", err)):
            if secret in text:
                pytest.fail(f"a secret key appears in {where}")


# ---------------------------------------------------------------- URIs and local paths


# ---------------------------------------------------------------- both backends


def test_round_trip(storage_root: str) -> None:
    root = resolve(storage_root)
    target = join(storage_root, "a", "b.bin")
    assert not exists(target)
    write_bytes(target, b"hello")
    assert read_bytes(target) == b"hello"
    assert exists(target)
    assert exists(join(storage_root, "a"))
    write_bytes(root.join("a/b.bin"), b"replaced")
    assert read_bytes(root.join("a", "b.bin")) == b"replaced"
    with pytest.raises(FileNotFoundError) as info:
        read_bytes(root.join("missing.bin"))
    assert "missing.bin" in str(info.value)
    assert not isinstance(info.value, StorageError)


def test_read_bounded_by_max_bytes(storage_root: str) -> None:
    target = join(storage_root, "blob.bin")
    write_bytes(target, b"x" * 100)
    assert read_bytes(target, max_bytes=100) == b"x" * 100
    with pytest.raises(ObjectTooLarge) as info:
        read_bytes(target, max_bytes=99)
    assert "blob.bin" in str(info.value) and "99" in str(info.value)
    empty = join(storage_root, "empty.bin")  # S3 refuses any Range on an empty object
    write_bytes(empty, b"")
    assert read_bytes(empty, max_bytes=10) == b""
    with pytest.raises(FileNotFoundError):
        read_bytes(join(storage_root, "missing.bin"), max_bytes=10)


def test_listing_sees_objects_just_written(storage_root: str) -> None:
    root = resolve(storage_root)
    assert list_files(root) == []
    write_bytes(root.join("img/1.jpg"), b"1")
    write_bytes(root.join("img/sub/2.PNG"), b"22")
    write_bytes(root.join("notes.txt"), b"333")
    first = list_files(root)
    assert [f.relpath for f in first] == ["img/1.jpg", "img/sub/2.PNG", "notes.txt"]
    assert [f.size for f in first] == [1, 2, 3]
    assert first[0].uri == join(root.uri, "img/1.jpg")
    assert read_bytes(first[1].uri) == b"22"

    write_bytes(root.join("img/3.jpeg"), b"4444")
    images = list_files(root, suffixes=(".jpg", ".jpeg", ".png"))
    assert [f.relpath for f in images] == ["img/1.jpg", "img/3.jpeg", "img/sub/2.PNG"]
    assert [f.relpath for f in list_files(root.join("img/sub"))] == ["2.PNG"]


def test_delete(storage_root: str) -> None:
    root = resolve(storage_root)
    write_bytes(root.join("d/1"), b"1")
    write_bytes(root.join("d/2"), b"2")
    write_bytes(root.join("keep"), b"k")
    delete(root.join("d/1"))
    assert [f.relpath for f in list_files(root)] == ["d/2", "keep"]
    delete(root.join("d"))
    delete(root.join("never-existed"))
    assert [f.relpath for f in list_files(root)] == ["keep"]


def test_parquet_through_pyarrow_filesystem(storage_root: str) -> None:
    table = pa.table({"image_id": ["a", "b"], "iou": [0.5, None]})
    loc = resolve(join(storage_root, "tables", "t.parquet"))
    fs, path = loc.pyarrow_fs()
    makedirs(join(storage_root, "tables"))
    pq.write_table(table, path, filesystem=fs, compression="zstd")
    assert pq.read_table(path, filesystem=fs).equals(table)
    # Written by pyarrow, seen by the fsspec side at once.
    assert read_bytes(loc)[:4] == b"PAR1"
    assert [f.relpath for f in list_files(join(storage_root, "tables"))] == ["t.parquet"]


# ---------------------------------------------------------------- S3: errors and retries


def test_explicit_endpoint_option(
    s3_env: SeaweedS3, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    options = StorageOptions(s3_endpoint=s3_env.endpoint)
    write_bytes(f"s3://{bucket}/x", b"x", options)
    assert read_bytes(f"s3://{bucket}/x", options) == b"x"
    fs, path = resolve(f"s3://{bucket}/x", options).pyarrow_fs()
    with fs.open_input_stream(path) as f:
        assert f.read() == b"x"


def test_missing_bucket_fails_at_once(s3_env: SeaweedS3, caplog: pytest.LogCaptureFixture) -> None:
    missing = "no-such-bucket-7f3e2a"
    for op in (
        lambda: read_bytes(f"s3://{missing}/k"),
        lambda: write_bytes(f"s3://{missing}/k", b"1"),
        lambda: list_files(f"s3://{missing}/prefix"),
        lambda: exists(f"s3://{missing}/k"),
        lambda: exists(f"s3://{missing}"),
    ):
        with pytest.raises(BucketNotFound) as info:
            op()
        assert repr(missing) in str(info.value)
        assert s3_env.endpoint in str(info.value)
        # Not an OSError: "skip the bad object" handlers must not swallow it.
        assert not isinstance(info.value, OSError)
        assert_no_secret(info.value, s3_env.secret_key)
    assert _retries(caplog) == 0


@pytest.mark.parametrize("what", ["wrong secret", "unknown key id", "no credentials"])
def test_bad_credentials_fail_at_once_without_the_secret(
    what: str,
    s3_env: SeaweedS3,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    uri = f"s3://{bucket}/obj.bin"
    write_bytes(uri, b"data")
    if what == "wrong secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", WRONG_SECRET)
    elif what == "unknown key id":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNUNKNOWN00")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", WRONG_SECRET)
    else:
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    for op in (
        lambda: read_bytes(uri),
        lambda: write_bytes(uri, b"other"),
        lambda: list_files(f"s3://{bucket}/"),
    ):
        with pytest.raises(AccessDenied) as info:
            op()
        message = str(info.value)
        assert bucket in message
        assert "credentials" in message
        assert_no_secret(info.value, s3_env.secret_key, WRONG_SECRET)
    assert _retries(caplog) == 0


def test_connection_refused_is_retried_then_fails(
    s3_env: SeaweedS3, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = f"http://127.0.0.1:{_free_port()}"
    policy = RetryPolicy(
        max_attempts=4, initial_delay_s=0.05, max_delay_s=0.1, client_max_attempts=1
    )
    options = StorageOptions(s3_endpoint=endpoint, retry=policy)
    with pytest.raises(StorageUnavailable) as info:
        read_bytes("s3://some-bucket/k", options)
    message = str(info.value)
    assert "after 4 attempt(s)" in message
    assert endpoint in message
    assert "s3://some-bucket/k" in message
    assert _retries(caplog) == 3
    assert_no_secret(info.value, s3_env.secret_key)


def test_server_restart_between_operations(
    s3_server: SeaweedS3, s3_env: SeaweedS3, bucket: str
) -> None:
    loc = resolve(f"s3://{bucket}/restart/a.bin")
    write_bytes(loc, b"before")
    assert read_bytes(loc) == b"before"  # the client now holds pooled connections
    s3_server.restart()
    # Connections pooled before the restart are dead; the client (or our retries) copes.
    assert read_bytes(loc) == b"before"
    write_bytes(f"s3://{bucket}/restart/b.bin", b"after")
    assert [f.relpath for f in list_files(f"s3://{bucket}/restart")] == ["a.bin", "b.bin"]


class _RetrySignal(logging.Handler):
    """Sets an event when pipeline.storage logs a retry."""

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            self.event.set()


def test_outage_is_retried_until_the_server_returns(
    s3_server: SeaweedS3, s3_env: SeaweedS3, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    policy = RetryPolicy(
        max_attempts=60,
        initial_delay_s=0.2,
        max_delay_s=1.0,
        max_total_s=120,
        client_max_attempts=1,
    )
    loc = resolve(f"s3://{bucket}/outage.bin", StorageOptions(retry=policy))
    write_bytes(loc, b"survives")
    s3_server.stop()
    signal = _RetrySignal()
    logging.getLogger(STORAGE_LOGGER).addHandler(signal)

    def bring_back() -> None:
        # Start again only once a read has failed and been scheduled for a retry.
        signal.event.wait(timeout=60)
        s3_server.start()

    thread = threading.Thread(target=bring_back, daemon=True)
    thread.start()
    try:
        assert read_bytes(loc) == b"survives"
    finally:
        thread.join(timeout=120)
        logging.getLogger(STORAGE_LOGGER).removeHandler(signal)
        if not s3_server.is_running():
            s3_server.start()
    assert _retries(caplog) >= 1


def test_pickles_and_reprs_hold_no_secret(s3_env: SeaweedS3, bucket: str) -> None:
    loc = resolve(f"s3://{bucket}/p")
    write_bytes(loc.join("x"), b"x")  # the fsspec client has now loaded the credentials
    fs, _ = loc.pyarrow_fs()
    for obj in (loc, loc.options, fs, loc.fs):
        assert s3_env.secret_key.encode() not in pickle.dumps(obj)
        assert s3_env.secret_key not in repr(obj)
    assert s3_env.secret_key not in repr(s3_env)
    clone = pickle.loads(pickle.dumps(loc))
    assert read_bytes(clone.join("x")) == b"x"
