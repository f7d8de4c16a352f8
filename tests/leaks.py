"""Checks that a secret never shows, for the storage tests (unit and integration)."""

from __future__ import annotations

import pytest

WRONG_SECRET = "wrong-secret-3f9c1d7e5b2a4c6d8e0f"


def assert_no_secret(exc: BaseException, *secrets: str) -> None:
    """No secret in the message or repr of the error or anything it chains to."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for secret in secrets:
            if secret in str(current) or secret in repr(current):
                pytest.fail(f"a secret key appears in a {type(current).__name__}")
        current = current.__cause__ or current.__context__
