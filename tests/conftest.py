"""Shared pytest configuration: test tiers, the GPU marker, a private data home.

Every tier runs in CI; only ``gpu`` tests skip, and only where no CUDA device
is present.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``XDG_DATA_HOME`` of the whole session (and of every Ray node and ``fcnpipe`` process
    it starts): the embedded catalogs of ``s3://`` output roots go there, not to the
    developer's ``~/.local/share``."""
    saved = os.environ.get("XDG_DATA_HOME")
    path = str(tmp_path_factory.mktemp("data-home"))
    os.environ["XDG_DATA_HOME"] = path
    try:
        yield path
    finally:
        if saved is None:
            os.environ.pop("XDG_DATA_HOME", None)
        else:
            os.environ["XDG_DATA_HOME"] = saved


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
