"""The project's own error types: bad input and unavailable services, told apart from bugs.

- :class:`InputError`: the input or the configuration is wrong (a missing bucket, a run id
  already committed, an unknown field). The message names the object and the reason. The
  CLI prints it as one line and exits 2; the flows never retry it (a retry cannot fix it).
- :class:`ServiceError`: a service the job needs failed or did not answer, after the retries
  (the S3 server down, a Ray job that failed on the cluster). One line, exit 1; the flows
  retry it.
- Anything else is a bug: the CLI lets it through with its traceback (exit 1), and the flows
  retry it once like any failure.
"""

from __future__ import annotations

import re
import sys

__all__ = ["ConfigError", "InputError", "ServiceError", "user_error"]


class InputError(Exception):
    """Bad input or configuration; the message names the object and the reason."""


class ConfigError(InputError, ValueError):
    """A configuration that cannot work (a field's value, or fields that contradict).

    A ``ValueError`` too, so that pydantic reports one raised in a dataclass's
    ``__post_init__`` as a validation error of the configuration.
    """


class ServiceError(Exception):
    """A service the job needs failed or did not answer, after retries."""


def user_error(error: BaseException) -> InputError | ServiceError | None:
    """The :class:`InputError` or :class:`ServiceError` behind ``error``, if any.

    An error raised inside a Ray worker reaches the driver wrapped: by Ray (a
    ``RayTaskError``, whose text is the worker's whole traceback; the original is its
    ``cause``), by Ray Train (``WorkerGroupError.worker_failures``,
    ``ControllerError.controller_failure``), or by Ray Data, which keeps only the worker's
    traceback as text (a UDF's error becomes a ``UserCodeException``, an actor that fails to
    start an ``ActorDiedError``): there the last line naming one of this project's error
    classes is the error (rebuilt as its base class, with its message). So the user reads
    the one line the worker raised, not Ray's wrapping of it.

    Args:
        error: What the driver caught.
    """
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    wrappers: list[BaseException] = []
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)  # RayTaskError: the worker's own exception
        if isinstance(cause, BaseException) and cause is not current:
            pending.insert(0, cause)
            wrappers.append(current)
            continue
        if isinstance(current, (InputError, ServiceError)):
            return current
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            pending.extend(f for f in failures.values() if isinstance(f, BaseException))
        controller = getattr(current, "controller_failure", None)
        if isinstance(controller, BaseException):
            pending.append(controller)
        if type(current).__module__.split(".")[0] == "ray":
            wrappers.append(current)
            if current.__cause__ is not None:
                pending.append(current.__cause__)
    for wrapper in wrappers:
        found = _from_traceback_text(str(wrapper))
        if found is not None:
            return found
    return None


_RAISED = re.compile(r"^(?P<module>(?:pipeline|flows)(?:\.\w+)*)\.(?P<name>\w+): (?P<message>.+)$")


def _from_traceback_text(text: str) -> InputError | ServiceError | None:
    """The last ``pipeline.x.SomeError: message`` line of a traceback, as its base class."""
    for line in reversed(text.splitlines()):
        match = _RAISED.match(line.strip())
        if match is None:
            continue
        module = sys.modules.get(match["module"])  # never imports: a class the driver knows
        cls = getattr(module, match["name"], None)
        if isinstance(cls, type) and issubclass(cls, InputError):
            return InputError(match["message"])
        if isinstance(cls, type) and issubclass(cls, ServiceError):
            return ServiceError(match["message"])
    return None
