"""Bad input to the Prefect commands: one clear line and exit 2, before Prefect or Ray start.

The schedule's argument checks run the entry point in this process (a process of its own
costs about 9 s of imports each); the other tests run the installed script.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.cli import CliResult, fcnpipe, fcnpipe_in_process

pytestmark = pytest.mark.e2e


def _one_line_error(
    args: list[str], expected: str, env: dict[str, str] | None = None, *, in_process: bool = False
) -> None:
    run = fcnpipe_in_process if in_process else fcnpipe
    result: CliResult | subprocess.CompletedProcess[str] = run(
        *args, env={"PREFECT_API_URL": "", **(env or {})}
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--cron", "every night"], "'every night' is not a cron expression"),
        (["--cron", "0 3 * * * *"], "exactly five fields"),
        (["--cron", "0 3 * * *", "--timezone", "Mars/Olympus"], "'Mars/Olympus' is not an IANA"),
        (["--cron", "0 3 * * *", "--set", "epochs=0"], "epochs must be >= 1"),
        (["--cron", "0 3 * * *", "--set", "epochs"], "expected FIELD=VALUE"),
        (["--cron", "0 3 * * *", "--set", "epoch=3"], "TrainConfig has no field 'epoch'"),
        (
            ["--cron", "0 3 * * *", "--set", "data.read.storage.anon=maybe"],
            "data.read.storage.anon",
        ),
        (["--cron", "0 3 * * *", "--epochs", "0"], "epochs must be >= 1"),
        (["--cron", "0 3 * * *", "--set", "run_id=fixed"], "derives its run id"),
    ],
)
def test_schedule_rejects_bad_input_in_one_line(
    tmp_path: Path, extra: list[str], expected: str
) -> None:
    _one_line_error(
        ["schedule", "train", str(tmp_path / "data"), "--output", str(tmp_path / "o"), *extra],
        expected,
        in_process=True,
    )


def test_flow_with_an_address_that_does_not_answer_is_one_line(tmp_path: Path) -> None:
    address = "http://127.0.0.1:9"  # discard port: nothing listens
    _one_line_error(
        ["flow", "train", str(tmp_path), "--output", str(tmp_path / "o"), "--ray-address", address],
        f"Ray address {address} does not answer",
    )


def test_flow_with_a_malformed_address_is_one_line(tmp_path: Path) -> None:
    _one_line_error(
        ["flow", "segment", str(tmp_path), "-m", "m", "-o", "o", "--ray-address", "ftp://x"],
        "not a dashboard URL",
    )


def test_schedule_without_a_prefect_server_is_one_line(tmp_path: Path) -> None:
    args = ["schedule", "train", str(tmp_path), "-o", str(tmp_path / "o"), "--cron", "0 3 * * *"]
    _one_line_error(args, "schedules need a Prefect server: set PREFECT_API_URL")
    _one_line_error(
        args, "Prefect server http://127.0.0.1:9/api does not answer",
        env={"PREFECT_API_URL": "http://127.0.0.1:9/api"},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], "--stream NAME is required"),
        (["--stream", "../x"], "invalid stream name"),
        (["--stream", "cam", "--run-id", "fixed"], "derives its run id"),
    ],
)
def test_schedule_segment_rejects_bad_input_in_one_line(
    tmp_path: Path, extra: list[str], expected: str
) -> None:
    _one_line_error(
        ["schedule", "segment", str(tmp_path), "-m", "m", "-o", "o", "--cron", "0 3 * * *", *extra],
        expected,
        in_process=True,
    )
