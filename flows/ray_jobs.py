"""Running a pipeline job on a Ray cluster through the Jobs API, idempotently.

A flow names each job with a submission id derived from its flow run. Submitting asks the
cluster first: a job of that id that is pending or running is attached to (its logs
followed) instead of starting a second one; one that succeeded is taken as done; one that
failed is followed by a new attempt, ``<id>-r1``, ``<id>-r2``..., so a retried task reruns
the job (which resumes from its checkpoints or completes its tables); one that was stopped
(``ray job stop``) is a decision, not rerun.

Token auth: the token is read from ``RAY_AUTH_TOKEN`` (or the file ``RAY_AUTH_TOKEN_PATH``
names) at each connection and sent as a header (:func:`connect`); it is never a parameter,
and never logged.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import InputError, ServiceError

__all__ = [
    "JobFailed",
    "JobStopped",
    "RayAddressError",
    "RayJob",
    "connect",
    "run_job",
    "submission_ids",
]

_TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
_MAX_ATTEMPTS = 100
_MAX_POLL_ERRORS = 10


class RayAddressError(InputError, ConnectionError):
    """The Ray dashboard address is malformed or does not answer."""


class JobFailed(ServiceError):
    """A Ray job ended FAILED (or STOPPED: :class:`JobStopped`)."""

    def __init__(self, submission_id: str, status: str, message: str, log_tail: str) -> None:
        self.submission_id = submission_id
        self.status = status
        self.log_tail = log_tail
        """The job's last log lines (the whole log went to the flow's log as it ran)."""
        super().__init__(
            f"Ray job {submission_id} {status}: {message or 'no message'}"
            f" (ray job logs {submission_id} shows its log)"
        )


class JobStopped(JobFailed):
    """A Ray job was stopped on the cluster (``ray job stop``): not rerun, not retried."""


@dataclass(frozen=True)
class RayJob:
    """A finished (succeeded) Ray job."""

    submission_id: str
    """The id the job ran under (the base id, or ``<base>-rN`` for a rerun)."""
    attached: bool
    """Whether it was already on the cluster (attached to) rather than submitted here."""
    seconds: float
    """Wall time from the call to the job's end."""


def _check_address(address: str, timeout_s: float) -> str:
    parts = urlsplit(address if "://" in address else f"http://{address}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RayAddressError(
            f"Ray address {address!r} is not a dashboard URL: use http://HOST:8265"
        )
    port = parts.port or (443 if parts.scheme == "https" else 8265)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise RayAddressError(
            f"Ray address {address} does not answer ({exc.strerror or exc}); is the cluster's "
            "dashboard (Jobs API, port 8265 by default) running and reachable?"
        ) from None
    return f"{parts.scheme}://{parts.hostname}:{port}{parts.path.rstrip('/')}"


def connect(address: str, *, timeout_s: float = 10.0) -> Any:
    """A ``JobSubmissionClient`` for a cluster's dashboard, checked to answer.

    Args:
        address: The dashboard URL, ``http://HOST:8265``.
        timeout_s: Seconds to wait for the TCP connection.

    Raises:
        RayAddressError: The address is malformed, does not answer, or is not a Ray
            dashboard (the message names it).
    """
    url = _check_address(address, timeout_s)
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(url, headers=_auth_headers())
        # The version check above needs no token: ask for something that does.
        client.list_jobs()
    except Exception as exc:  # refused, 401/403 (no or a wrong token), not a Ray dashboard
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RayAddressError(f"Ray address {address}: {reason}") from None
    return client


def _auth_headers() -> dict[str, str]:
    """The token header, from ``RAY_AUTH_TOKEN`` (or the file ``RAY_AUTH_TOKEN_PATH`` names).

    Read at every call: Ray's own loader caches the first token a process sees, which is
    wrong for a process that talks to more than one cluster. Without either variable, Ray's
    client adds its default (``~/.ray/auth_token``) when token auth is on.
    """
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path:
        token = Path(path).expanduser().read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def submission_ids(base: str) -> list[str]:
    """The ids a job may run under, in order: ``base``, ``base-r1``, ``base-r2``...

    Args:
        base: The deterministic id (from the flow run and the job's name).
    """
    return [base] + [f"{base}-r{n}" for n in range(1, _MAX_ATTEMPTS)]


def run_job(
    client: Any,
    base_id: str,
    entrypoint: str,
    *,
    runtime_env: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
    log: Callable[[str], None] = print,
    poll_s: float = 2.0,
) -> RayJob:
    """Run (or attach to) the job ``base_id`` and follow its log until it ends.

    Args:
        client: From :func:`connect`.
        base_id: Deterministic submission id; see the module docstring for reruns.
        entrypoint: Shell command the cluster runs.
        runtime_env: Ray runtime environment of a new submission.
        metadata: Labels of a new submission (shown by ``ray job list``).
        log: Where the job's log lines go.
        poll_s: Seconds between status and log polls.

    Raises:
        JobFailed: The job ended FAILED (its last log lines in ``log_tail``).
        JobStopped: The job (or an earlier attempt) was stopped on the cluster.
    """
    started = time.monotonic()
    for submission_id in submission_ids(base_id):
        status = _status(client, submission_id)
        if status == "FAILED":
            continue  # a failed attempt: the next id reruns the job (it resumes its run)
        if status == "STOPPED":
            # Somebody stopped it on purpose (`ray job stop`): do not undo that.
            raise JobStopped(submission_id, status, "stopped on the cluster; not rerun", "")
        attached = status is not None
        if not attached:
            try:
                client.submit_job(
                    entrypoint=entrypoint,
                    submission_id=submission_id,
                    runtime_env=dict(runtime_env or {}),
                    metadata=dict(metadata or {}),
                )
                log(f"submitted Ray job {submission_id}")
            except RuntimeError as exc:
                if "already exists" not in str(exc):
                    raise
                attached = True  # submitted by a twin of this task since we looked
        if attached:
            log(f"attaching to Ray job {submission_id} ({status or 'just submitted'})")
        _follow(client, submission_id, log, poll_s)
        return RayJob(submission_id, attached, time.monotonic() - started)
    raise JobFailed(base_id, "FAILED", f"gave up after {_MAX_ATTEMPTS} attempts", "")


def _status(client: Any, submission_id: str) -> str | None:
    """The job's status, or None when the cluster has no job of that id."""
    try:
        return str(client.get_job_info(submission_id).status)
    except RuntimeError as exc:  # the SDK raises RuntimeError for every non-200 answer
        if "status code 404" in str(exc):
            return None
        raise


def _follow(client: Any, submission_id: str, log: Callable[[str], None], poll_s: float) -> None:
    printed = 0
    errors = 0
    while True:
        try:
            info = client.get_job_info(submission_id)
            logs = client.get_job_logs(submission_id)
            errors = 0
        except (RuntimeError, OSError) as exc:
            # The head restarting or a network blip: the job itself is unaffected.
            errors += 1
            if errors >= _MAX_POLL_ERRORS:
                raise
            log(f"polling Ray job {submission_id} failed ({exc}); retrying")
            time.sleep(poll_s * errors)
            continue
        status = str(info.status)
        # Whole lines only: the last one may still be being written.
        end = logs.rfind("\n") + 1 if status not in _TERMINAL else len(logs)
        for line in logs[printed:end].splitlines():
            log(line)
        printed = max(printed, end)
        if status == "SUCCEEDED":
            return
        if status in _TERMINAL:
            tail = "\n".join(logs.rstrip().splitlines()[-20:])
            # Ray's message repeats the log after its first line; the log was followed above.
            first = (info.message or "").strip().splitlines()[:1]
            message = first[0].split(", last available logs")[0] if first else ""
            failure = JobStopped if status == "STOPPED" else JobFailed
            raise failure(submission_id, status, message, tail)
        time.sleep(poll_s)
