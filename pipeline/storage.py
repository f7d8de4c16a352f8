"""Storage: the one module that turns a URI into filesystem objects.

Every job addresses data by URI: a plain path or ``file://`` (the local filesystem),
``s3://bucket/key`` (AWS S3 or any S3-compatible server, e.g. SeaweedFS) or ``gs://bucket/key``
(where ``gcsfs`` is installed). :func:`resolve` returns a :class:`Location` holding the
fsspec filesystem for Python-side I/O and building the ``pyarrow.fs`` filesystem Ray Data and
Ray Train need. Nothing else in the project builds filesystems.

Credentials never pass through this module: s3fs/botocore and pyarrow's AWS SDK read them
in the process that does the I/O, from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and the AWS config files. So no object here (options,
locations, filesystems, their pickles and reprs) ever holds a secret, and Ray tasks receiving
them read the credentials of the worker they run on. To use a named profile, set
``AWS_PROFILE``: both libraries honour it, whereas pyarrow cannot take a profile name
without the keys being passed to it (and then pickled along with it).

The S3 endpoint is the explicit ``StorageOptions.s3_endpoint`` or else ``AWS_ENDPOINT_URL_S3``
/ ``AWS_ENDPOINT_URL``, resolved once by :func:`resolve` and passed explicitly to both
libraries (``pyarrow.fs.S3FileSystem`` ignores ``AWS_ENDPOINT_URL``). Path-style addressing.

Errors: a missing bucket raises :class:`BucketNotFound` and bad or missing credentials
:class:`AccessDenied` at once; transient failures (connection refused or reset, timeouts,
5xx, throttling) are retried by the client libraries (``RetryPolicy.client_max_attempts`` per
request) and, around each helper call here, with exponential backoff
(``RetryPolicy.max_attempts``, ``max_total_s``), then raise :class:`StorageUnavailable`.
A missing object is a plain ``FileNotFoundError``.

Example::

    root = resolve("s3://data/voc")
    for entry in list_files(root, suffixes=(".jpg", ".png")):
        data = read_bytes(root.join(entry.relpath))
    fs, path = root.pyarrow_fs()  # for ray.data.read_*(path, filesystem=fs)
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import posixpath
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

import fsspec
import pyarrow.fs as pafs

from pipeline.errors import ConfigError, InputError, ServiceError

logger = logging.getLogger(__name__)

T = TypeVar("T")

SUPPORTED_SCHEMES: tuple[str, ...] = ("file", "s3", "gs")
"""URI schemes :func:`resolve` accepts (a plain path means ``file``)."""

_SCHEME_ALIASES = {"file": "file", "s3": "s3", "gs": "gs", "gcs": "gs"}

# botocore/S3 error codes that mean "this will not get better by retrying".
_BUCKET_MISSING_CODES = frozenset({"NoSuchBucket"})
_ACCESS_DENIED_CODES = frozenset(
    {
        "403",
        "AccessDenied",
        "AccountProblem",
        "AllAccessDisabled",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidSecurity",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "RequestTimeTooSkewed",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "TooManyRequests",
        "500",
        "502",
        "503",
        "504",
    }
)


class StorageError(Exception):
    """A storage failure that retrying or skipping the object will not fix.

    Deliberately not an ``OSError``: code that turns a bad object into an error row
    (``except OSError``) must not turn a wrong bucket or bad credentials into a million
    error rows; these stop the job.
    """


class BucketNotFound(StorageError, InputError):
    """The bucket does not exist."""


class AccessDenied(StorageError, InputError):
    """The credentials are missing, wrong, or not allowed to do this."""


class StorageUnavailable(StorageError, ServiceError):
    """Transient errors went on past the retry budget (server down, throttled, timing out)."""


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How transient storage errors are retried.

    Two layers: the client library retries each request (``client_max_attempts``; this is
    all that protects direct use of ``Location.fs`` or ``Location.pyarrow_fs()``, e.g. by Ray
    Data, which adds its own retries), and the helpers of this module retry whole operations
    with exponential backoff and jitter (``max_attempts``, bounded by ``max_total_s``).
    """

    __pydantic_config__: ClassVar[dict[str, str]] = {
        "extra": "forbid"
    }  # unknown JSON fields are errors

    max_attempts: int = 8
    """Attempts per helper operation (read_bytes, write_bytes, exists, list_files, delete).
    Eight spans about 30 s of backoff: an S3 server restarting (about 10 s) is ridden out."""
    initial_delay_s: float = 0.5
    """Delay before the second attempt; doubles each attempt (with jitter)."""
    max_delay_s: float = 8.0
    """Cap on a single delay."""
    max_total_s: float = 60.0
    """No new attempt starts once this much time has passed since the first."""
    client_max_attempts: int = 3
    """Attempts per request inside botocore (s3fs) and pyarrow's AWS SDK."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.client_max_attempts < 1:
            raise ConfigError(
                f"max_attempts and client_max_attempts must be >= 1, got "
                f"{self.max_attempts} and {self.client_max_attempts}"
            )
        if self.initial_delay_s < 0 or self.max_delay_s < self.initial_delay_s:
            raise ConfigError(
                f"need 0 <= initial_delay_s <= max_delay_s, got {self.initial_delay_s} "
                f"and {self.max_delay_s}"
            )
        if self.max_total_s <= 0:
            raise ConfigError(f"max_total_s must be > 0, got {self.max_total_s}")

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt ``attempt`` (1-based): exponential, jittered.

        Args:
            attempt: The attempt that just failed.
        """
        base = min(self.max_delay_s, self.initial_delay_s * 2 ** (attempt - 1))
        return base * (0.5 + random.random() / 2)


@dataclass(frozen=True, kw_only=True)
class StorageOptions:
    """How to reach object storage. Holds no credentials (see the module docstring).

    The same options travel from the CLI or a flow into Ray workers.
    """

    __pydantic_config__: ClassVar[dict[str, str]] = {
        "extra": "forbid"
    }  # unknown JSON fields are errors

    s3_endpoint: str | None = None
    """S3 endpoint URL ``http(s)://host[:port]``; None: ``AWS_ENDPOINT_URL_S3`` /
    ``AWS_ENDPOINT_URL``, else AWS itself."""
    s3_region: str | None = None
    """S3 region; None: ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else the libraries' default."""
    anon: bool = False
    """Unsigned requests (public buckets); no credentials are looked up."""
    connect_timeout_s: float = 10.0
    """Timeout for opening a connection to the storage endpoint."""
    read_timeout_s: float = 60.0
    """Timeout for a response (botocore; pyarrow's AWS SDK applies it on macOS/Windows only)."""
    retry: RetryPolicy = field(default_factory=RetryPolicy, metadata={"cli": False})
    """Retry policy for transient errors."""
    catalog: str | None = None
    """Iceberg catalog of the result tables: a REST (``https://host/path``), Hive
    (``thrift://host:9083``), Glue (``glue://``) or SQL (``sqlite:////path.db``) URI, or a catalog
    name from the pyiceberg configuration; None: ``FCNPIPE_CATALOG``, else the embedded SQLite
    catalog of the output root (``pipeline.store.catalog``). Never with credentials in it."""

    def __post_init__(self) -> None:
        if self.s3_endpoint is not None:
            object.__setattr__(self, "s3_endpoint", _check_endpoint(self.s3_endpoint))
        if self.catalog is not None:
            _check_catalog(self.catalog)
        if self.s3_region is not None and (
            not self.s3_region or any(c.isspace() for c in self.s3_region)
        ):
            raise ConfigError(f"s3_region must be a region name like us-east-1: {self.s3_region!r}")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ConfigError(
                f"timeouts must be > 0, got connect_timeout_s={self.connect_timeout_s}, "
                f"read_timeout_s={self.read_timeout_s}"
            )

    def with_environment(self) -> StorageOptions:
        """These options with the endpoint, region and catalog filled in from the environment."""
        endpoint = self.s3_endpoint
        if endpoint is None:
            env_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
                "AWS_ENDPOINT_URL"
            )
            endpoint = env_endpoint or None
        region = (
            self.s3_region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or None
        )
        catalog = self.catalog or os.environ.get("FCNPIPE_CATALOG") or None
        if catalog is not None and catalog != self.catalog:
            _check_catalog(catalog, source="FCNPIPE_CATALOG")
        return replace(self, s3_endpoint=endpoint, s3_region=region, catalog=catalog)


def _check_endpoint(endpoint: str) -> str:
    """Validate ``http(s)://host[:port]`` and return it without a trailing slash."""
    if "@" in endpoint:
        # Never echo the value: user info may hold a password.
        raise ConfigError(
            "s3_endpoint must be http(s)://host[:port] without user:password@ "
            "(value not shown: it may hold a password)"
        )
    problem = f"s3_endpoint must be http(s)://host[:port], got {endpoint!r}"
    try:
        parts = urlsplit(endpoint)
        port = parts.port  # raises ValueError on a bad port
    except ValueError:
        raise ConfigError(problem) from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ConfigError(problem)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


_SECRET_WORDS = ("credential", "secret", "password", "token", "key")


def _check_catalog(catalog: str, source: str = "catalog") -> None:
    """Refuse a catalog URI that could carry a secret (values never echoed)."""
    parts = urlsplit(catalog)
    if parts.password is not None or (parts.username and "@" in parts.netloc):
        raise ConfigError(
            f"{source} must not hold user:password@ (value not shown: it may hold a password); "
            "credentials come from the environment (PYICEBERG_CATALOG__FCNPIPE__CREDENTIAL, "
            "__TOKEN, or the libraries' own variables)"
        )
    for pair in parts.query.split("&") if parts.query else ():
        name = pair.partition("=")[0].lower()
        if any(word in name for word in _SECRET_WORDS):
            raise ConfigError(
                f"{source}: property {name!r} looks like a credential (value not shown); set it "
                f"in the environment instead (PYICEBERG_CATALOG__FCNPIPE__{name.upper()})"
            )


@dataclass(frozen=True)
class FileInfo:
    """One object found by :func:`list_files`."""

    uri: str
    """Full URI, accepted by every function here."""
    relpath: str
    """Path relative to the listed root, ``/``-separated."""
    size: int
    """Size in bytes."""
    modified: float | None = None
    """Last modification, seconds since the epoch (None where the store does not say)."""
    etag: str | None = None
    """The object's ETag where the listing gives one (S3, GCS), quotes stripped; None
    locally."""

    @property
    def version(self) -> str:
        """What changes when the object is rewritten: its ETag, else its size and
        modification time (from the listing itself: no request per object)."""
        if self.etag:
            return f"etag:{self.etag}"
        return f"size:{self.size},mtime:{self.modified!r}"


@dataclass(frozen=True)
class Location:
    """A URI resolved to a filesystem and a path inside it. Build with :func:`resolve`.

    Locations pickle (into Ray tasks) without credentials; joined locations share one
    filesystem object, so use ``root.join(...)`` in loops to reuse connections.
    """

    uri: str
    """Canonical URI: ``s3://bucket/key``, ``gs://bucket/key``, or an absolute local path."""
    scheme: str
    """``file``, ``s3`` or ``gs``."""
    path: str
    """Path inside :attr:`fs`: ``bucket/key`` or an absolute local path."""
    options: StorageOptions
    """Options with the endpoint and region resolved."""
    fs: Any = field(repr=False, compare=False)
    """The fsspec filesystem (``fsspec.AbstractFileSystem``)."""

    def __str__(self) -> str:
        return self.uri

    @property
    def is_local(self) -> bool:
        """Whether this is on the local filesystem."""
        return self.scheme == "file"

    @property
    def bucket(self) -> str | None:
        """The bucket of an object-store location; None for local paths."""
        return None if self.is_local else self.path.split("/", 1)[0]

    def join(self, *parts: str) -> Location:
        """A location below this one, sharing its filesystem.

        Args:
            parts: Relative path parts; may contain ``/``; no ``..`` and no absolute parts.
        """
        suffix = _join_parts(self.uri, parts)
        if not suffix:
            return self
        path = f"{self.path.rstrip('/')}/{suffix}"
        return replace(self, uri=_format_uri(self.scheme, path), path=path)

    def pyarrow_fs(self) -> tuple[pafs.FileSystem, str]:
        """The ``pyarrow.fs`` filesystem and the path inside it (Ray Data, Ray Train, Parquet).

        For S3 the endpoint and scheme are passed explicitly; credentials are left to
        pyarrow's AWS SDK (environment, profile, config files) in whichever process uses
        the filesystem, so its pickle holds none. Note that a pickled ``S3FileSystem`` comes
        back with pyarrow's default retry strategy (3 attempts).
        """
        if self.scheme == "file":
            return pafs.LocalFileSystem(), self.path
        if self.scheme == "gs":
            return pafs.GcsFileSystem(anonymous=self.options.anon), self.path
        opts = self.options
        kwargs: dict[str, Any] = {
            "anonymous": opts.anon,
            "connect_timeout": opts.connect_timeout_s,
            "request_timeout": opts.read_timeout_s,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(
                max_attempts=opts.retry.client_max_attempts
            ),
            "force_virtual_addressing": False,
        }
        if opts.s3_region:
            kwargs["region"] = opts.s3_region
        if opts.s3_endpoint:
            endpoint = urlsplit(opts.s3_endpoint)
            kwargs["scheme"] = endpoint.scheme
            kwargs["endpoint_override"] = endpoint.netloc
        return pafs.S3FileSystem(**kwargs), self.path

    @property
    def iceberg_uri(self) -> str:
        """The URI Iceberg metadata uses for this location (``file:///abs`` for local paths)."""
        return f"file://{self.path}" if self.is_local else self.uri

    def iceberg_properties(self) -> dict[str, str]:
        """pyiceberg FileIO properties that reach this location (its endpoint, region,
        path-style addressing, timeouts); no credentials: pyiceberg's pyarrow FileIO reads
        them from the environment as :meth:`pyarrow_fs` does."""
        opts = self.options
        if self.scheme != "s3":
            return {}
        props = {
            # Always set: without a region pyiceberg asks AWS where the bucket is.
            "s3.region": opts.s3_region or "us-east-1",
            "s3.force-virtual-addressing": "false",
            "s3.connect-timeout": f"{opts.connect_timeout_s:g}",
            "s3.request-timeout": f"{opts.read_timeout_s:g}",
        }
        if opts.s3_endpoint:
            props["s3.endpoint"] = opts.s3_endpoint
        if opts.anon:
            props["s3.anonymous"] = "true"
        return props


def resolve(uri: str | Path | Location, options: StorageOptions | None = None) -> Location:
    """Turn a URI into a :class:`Location`.

    Args:
        uri: ``s3://bucket/key``, ``gs://bucket/key``, ``file:///abs/path`` or a plain path
            (made absolute). A Location is returned as it is.
        options: Endpoint, region, timeouts and retries; defaults from the environment.

    Raises:
        ValueError: Unknown scheme or malformed URI (the message names both).
        StorageError: ``gs://`` without ``gcsfs`` installed.
    """
    if isinstance(uri, Location):
        return uri
    scheme, path = _split_uri(str(uri))
    opts = (options or StorageOptions()).with_environment()
    return Location(
        uri=_format_uri(scheme, path),
        scheme=scheme,
        path=path,
        options=opts,
        fs=_fsspec_filesystem(scheme, opts, str(uri)),
    )


def join(uri: str, *parts: str) -> str:
    """Join relative parts onto a URI or path with ``/``.

    Args:
        uri: The base URI (any form :func:`resolve` accepts).
        parts: Relative parts; may contain ``/``; no ``..`` and no absolute parts.

    Raises:
        ValueError: A part is absolute or has a ``..`` component.
    """
    suffix = _join_parts(uri, parts)
    if not suffix:
        return uri
    return f"{uri}{suffix}" if uri.endswith("/") else f"{uri}/{suffix}"


class ObjectTooLarge(ValueError):
    """An object larger than the caller's ``max_bytes``."""


def read_bytes(
    target: str | Location,
    options: StorageOptions | None = None,
    *,
    max_bytes: int | None = None,
) -> bytes:
    """Read a whole object, or refuse one larger than ``max_bytes`` without reading it all.

    Args:
        target: The object's URI or Location.
        options: Used when ``target`` is a string.
        max_bytes: Read at most ``max_bytes + 1`` bytes (one ranged request) and raise
            :class:`ObjectTooLarge` if there were more; None reads everything.

    Raises:
        FileNotFoundError: No such object.
        ObjectTooLarge: The object is larger than ``max_bytes``.
        BucketNotFound, AccessDenied, StorageUnavailable: See the module docstring.
    """
    loc = resolve(target, options)
    if max_bytes is None:
        data: bytes = _call("read", loc, lambda: loc.fs.cat_file(loc.path))
        return data

    def ranged() -> bytes:
        try:
            data: bytes = loc.fs.cat_file(loc.path, start=0, end=max_bytes + 1)
        except OSError:
            # S3 answers any Range on an empty object with 416 InvalidRange.
            if loc.fs.size(loc.path) == 0:
                return b""
            raise
        return data

    head = _call("read", loc, ranged)
    if len(head) > max_bytes:
        raise ObjectTooLarge(f"{loc.uri}: larger than max_bytes {max_bytes}")
    return head


def read_range(target: str | Location, start: int, stop: int) -> bytes:
    """Bytes ``[start, stop)`` of an object (one ranged request; fewer at its end).

    Raises:
        FileNotFoundError: No such object.
        BucketNotFound, AccessDenied, StorageUnavailable: See the module docstring.
    """
    loc = resolve(target)
    data: bytes = _call("read", loc, lambda: loc.fs.cat_file(loc.path, start=start, end=stop))
    return data


def upload(path: Path, target: str | Location, options: StorageOptions | None = None) -> None:
    """Copy a local file to ``target`` (streamed: a large file is never all in memory)."""
    loc = resolve(target, options)
    if loc.is_local:
        Path(loc.path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{loc.path}.tmp-{os.getpid()}")
        shutil.copyfile(path, tmp)
        os.replace(tmp, loc.path)
    else:
        _call("write", loc, lambda: loc.fs.put_file(str(path), loc.path))


def size(target: str | Location, options: StorageOptions | None = None) -> int:
    """An object's size in bytes.

    Raises:
        FileNotFoundError: No such object.
    """
    loc = resolve(target, options)
    return int(_call("stat", loc, lambda: loc.fs.size(loc.path)))


def write_bytes(target: str | Location, data: bytes, options: StorageOptions | None = None) -> None:
    """Write a whole object so readers see the old content or the new, never a part.

    Local files are written to a temporary name beside the target and renamed over it
    (parent directories are created); on object stores a single PUT (or a multipart upload
    completed at the end) is atomic.

    Args:
        target: The object's URI or Location.
        data: The content.
        options: Used when ``target`` is a string.
    """
    loc = resolve(target, options)
    if loc.is_local:
        _call("write", loc, lambda: _write_local_atomic(Path(loc.path), data))
    else:
        _call("write", loc, lambda: loc.fs.pipe_file(loc.path, data))


def exists(target: str | Location, options: StorageOptions | None = None) -> bool:
    """Whether an object (or a directory / key prefix) exists.

    Args:
        target: The URI or Location.
        options: Used when ``target`` is a string.

    Raises:
        BucketNotFound: The bucket itself is missing (a typo should not read as "absent").
    """
    loc = resolve(target, options)

    def probe() -> bool:
        try:
            loc.fs.info(loc.path)
        except FileNotFoundError as exc:
            if not loc.is_local and _error_kind(exc) == "bucket":
                raise
            return False
        return True

    return _call("exists", loc, probe)


def list_files(
    target: str | Location,
    suffixes: Iterable[str] | None = None,
    options: StorageOptions | None = None,
) -> list[FileInfo]:
    """All objects below a URI, recursively, sorted by URI (one paged listing, no HEADs).

    Args:
        target: The root URI or Location; a missing root gives an empty list.
        suffixes: Keep only names ending with one of these (case-insensitive), e.g.
            ``(".jpg", ".png")``; None keeps everything.
        options: Used when ``target`` is a string.
    """
    loc = resolve(target, options)
    wanted = tuple(s.lower() for s in suffixes) if suffixes is not None else None
    found: dict[str, dict[str, Any]] = _call(
        "list", loc, lambda: loc.fs.find(loc.path, detail=True)
    )
    root = loc.path.rstrip("/")
    out: list[FileInfo] = []
    for name, info in found.items():
        if info.get("type") != "file":
            continue
        if wanted is not None and not name.lower().endswith(wanted):
            continue
        relpath = name[len(root) + 1 :] if name.startswith(root + "/") else posixpath.basename(name)
        out.append(
            FileInfo(
                uri=_format_uri(loc.scheme, name),
                relpath=relpath,
                size=int(info["size"]),
                modified=_modified(info),
                etag=_etag(info),
            )
        )
    out.sort(key=lambda f: f.uri)
    return out


def delete(target: str | Location, options: StorageOptions | None = None) -> None:
    """Delete an object or everything below a prefix / directory; a missing one is fine.

    Args:
        target: The URI or Location.
        options: Used when ``target`` is a string.
    """
    loc = resolve(target, options)

    def remove() -> None:
        try:
            loc.fs.rm(loc.path, recursive=True)
        except FileNotFoundError as exc:
            if not loc.is_local and _error_kind(exc) == "bucket":
                raise

    _call("delete", loc, remove)


def makedirs(target: str | Location, options: StorageOptions | None = None) -> None:
    """Create a directory and its parents on the local filesystem; a no-op on object stores.

    Needed before writing with ``pyarrow.fs.LocalFileSystem`` (e.g. ``pq.write_table``),
    which does not create parent directories; object stores have no directories.

    Args:
        target: The directory's URI or Location.
        options: Used when ``target`` is a string.
    """
    loc = resolve(target, options)
    if loc.is_local:
        Path(loc.path).mkdir(parents=True, exist_ok=True)


def to_local_path(dest_root: str | Path, key: str) -> Path:
    """Map an object key (``a/b.png``) to a path under a local destination directory.

    Object keys never escape a destination: a key with a ``..`` component, an absolute key
    or one naming no file is rejected.

    Args:
        dest_root: The local destination directory.
        key: The object key, ``/``-separated, relative to the listed root.

    Raises:
        ValueError: The key would escape ``dest_root`` (the message names the key).
    """
    parts = key.split("/")
    if (
        not key
        or key.startswith("/")
        or "\x00" in key
        or any(p == ".." for p in parts)
        or (len(parts[0]) >= 2 and parts[0][1] == ":")  # a Windows drive, e.g. C:
    ):
        raise ValueError(f"object key {key!r} escapes the destination {str(dest_root)!r}")
    root = Path(dest_root).absolute()
    path = root.joinpath(*[p for p in parts if p not in ("", ".")])
    if path == root or not path.is_relative_to(root):
        raise ValueError(f"object key {key!r} names no file under {str(dest_root)!r}")
    return path


# ----------------------------------------------------------------------------- internals


def _split_uri(uri: str) -> tuple[str, str]:
    """Split a URI into (scheme, path inside the filesystem)."""
    supported = ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES) + " or a plain path"
    if not uri:
        raise ConfigError(f"empty URI; expected {supported}")
    if "://" not in uri:
        return "file", os.path.abspath(os.path.expanduser(uri))
    raw_scheme, rest = uri.split("://", 1)
    scheme = _SCHEME_ALIASES.get(raw_scheme.lower())
    if scheme is None:
        raise ConfigError(f"unsupported URI scheme {raw_scheme!r} in {uri!r}; expected {supported}")
    if scheme == "file":
        host, sep, local = rest.partition("/")
        if host not in ("", "localhost") or not sep:
            raise ConfigError(f"file URI {uri!r} must be file:///absolute/path")
        return "file", os.path.abspath("/" + local)
    bucket, _, key = rest.partition("/")
    if not bucket or "@" in bucket or "?" in rest or "#" in rest:
        raise ConfigError(f"{scheme} URI {uri!r} must be {scheme}://bucket[/key]")
    key = key.strip("/")
    return scheme, f"{bucket}/{key}" if key else bucket


def _format_uri(scheme: str, path: str) -> str:
    return path if scheme == "file" else f"{scheme}://{path}"


def _join_parts(base: str, parts: Iterable[str]) -> str:
    cleaned: list[str] = []
    for part in parts:
        if part.startswith("/"):
            raise ConfigError(f"cannot join absolute part {part!r} onto {base!r}")
        pieces = [p for p in part.split("/") if p not in ("", ".")]
        if ".." in pieces:
            raise ConfigError(f"cannot join {part!r} onto {base!r}: '..' is not allowed")
        cleaned.extend(pieces)
    return "/".join(cleaned)


def _fsspec_filesystem(scheme: str, opts: StorageOptions, uri: str) -> Any:
    if scheme == "file":
        return fsspec.filesystem("file")
    if scheme == "gs":
        if importlib.util.find_spec("gcsfs") is None:
            raise StorageError(
                f"{uri}: gs:// needs the gcsfs package, which is not installed (pip install gcsfs)"
            )
        return fsspec.filesystem("gs", token="anon" if opts.anon else None)
    import s3fs  # imported here: local-only runs never pay for aiobotocore

    client_kwargs: dict[str, Any] = {}
    if opts.s3_endpoint:
        client_kwargs["endpoint_url"] = opts.s3_endpoint
    if opts.s3_region:
        client_kwargs["region_name"] = opts.s3_region
    fs = s3fs.S3FileSystem(
        anon=opts.anon,
        client_kwargs=client_kwargs,
        config_kwargs={
            "s3": {"addressing_style": "path"},
            "retries": {"mode": "standard", "total_max_attempts": opts.retry.client_max_attempts},
            "connect_timeout": opts.connect_timeout_s,
            "read_timeout": opts.read_timeout_s,
        },
        # Objects written a moment ago must show up in the next listing.
        use_listings_cache=False,
        skip_instance_cache=True,
    )
    # botocore's standard mode already retries every request (client_max_attempts) and the
    # helpers above retry whole operations; s3fs's own loop (a class attribute, 5) would
    # multiply both under throttling. The instance is ours alone (skip_instance_cache).
    fs.retries = 1
    return fs


def _etag(info: dict[str, Any]) -> str | None:
    """The ETag of an fsspec listing entry (``ETag`` on S3, ``etag`` on GCS), unquoted."""
    value = info.get("ETag", info.get("etag"))
    return str(value).strip('"') or None if value else None


def _modified(info: dict[str, Any]) -> float | None:
    """Modification time of an fsspec listing entry (``mtime`` locally, ``LastModified`` on S3)."""
    value = info.get("mtime", info.get("LastModified"))
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime):
        return value.timestamp()
    return None


def _write_local_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with tmp.open("wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and its causes/contexts, each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _error_kind(exc: BaseException) -> str:
    """Classify an error: ``bucket``, ``denied``, ``transient`` or ``other``."""
    import botocore.exceptions as bexc  # s3fs's dependency; only S3 errors carry its types

    for err in _chain(exc):
        response = getattr(err, "response", None)
        if isinstance(err, bexc.ClientError) and isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            operation = getattr(err, "operation_name", "")
            if code in _BUCKET_MISSING_CODES or (operation == "HeadBucket" and status == 404):
                return "bucket"
            if code in _ACCESS_DENIED_CODES:
                return "denied"
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                return "transient"
            return "other"
        if isinstance(err, bexc.NoCredentialsError | bexc.PartialCredentialsError):
            return "denied"
        if isinstance(err, bexc.SSLError):
            return "other"
        if isinstance(err, bexc.ConnectionError | bexc.HTTPClientError):
            return "transient"
        if isinstance(err, ConnectionError | TimeoutError):  # builtins, incl. asyncio timeouts
            return "transient"
    return "other"


def _describe(exc: BaseException) -> str:
    """A one-line description of an error (server messages never carry secrets)."""
    return f"{type(exc).__name__}: {exc}"


def _call(op: str, loc: Location, fn: Callable[[], T]) -> T:
    """Run one storage operation, retrying transient errors and translating fatal ones."""
    policy = loc.options.retry
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if loc.is_local:
                raise
            kind = _error_kind(exc)
            if kind == "bucket":
                raise BucketNotFound(
                    f"{op} {loc.uri}: bucket {loc.bucket!r} does not exist{_endpoint_note(loc)}"
                ) from exc
            if kind == "denied":
                raise AccessDenied(
                    f"{op} {loc.uri}: access denied to bucket {loc.bucket!r}{_endpoint_note(loc)}"
                    f" ({_describe(exc)}); check the AWS credentials "
                    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and permissions"
                ) from exc
            if kind != "transient":
                if isinstance(exc, FileNotFoundError):
                    # s3fs says only "bucket/key"; name the URI.
                    raise FileNotFoundError(errno.ENOENT, "no such object", loc.uri) from exc
                raise
            elapsed = time.monotonic() - started
            delay = policy.delay(attempt)
            if attempt >= policy.max_attempts or elapsed + delay > policy.max_total_s:
                raise StorageUnavailable(
                    f"{op} {loc.uri}: still failing after {attempt} attempt(s) over "
                    f"{elapsed:.1f} s{_endpoint_note(loc)}: {_describe(exc)}"
                ) from exc
            logger.warning(
                "%s %s: transient error (%s); attempt %d/%d failed, retrying in %.2f s",
                op,
                loc.uri,
                _describe(exc),
                attempt,
                policy.max_attempts,
                delay,
            )
            time.sleep(delay)


def _endpoint_note(loc: Location) -> str:
    endpoint = loc.options.s3_endpoint if loc.scheme == "s3" else None
    return f" at {endpoint}" if endpoint else ""
