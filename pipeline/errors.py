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

__all__ = ["ConfigError", "InputError", "ServiceError"]


class InputError(Exception):
    """Bad input or configuration; the message names the object and the reason."""


class ConfigError(InputError, ValueError):
    """A configuration that cannot work (a field's value, or fields that contradict).

    A ``ValueError`` too, so that pydantic reports one raised in a dataclass's
    ``__post_init__`` as a validation error of the configuration.
    """


class ServiceError(Exception):
    """A service the job needs failed or did not answer, after retries."""
