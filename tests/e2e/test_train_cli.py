"""`fcnpipe train` as a user runs it: configurations that cannot work fail at once.

Each case is one line on stderr, exit code 2, and no Ray started (the checks run before any
worker, and before Ray itself). The cases run the entry point in this process (a process of
its own costs about 9 s of imports each); the last test runs the installed script.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fcn.synthetic import CLASS_NAMES
from pipeline.data.synthetic import write_synthetic
from pipeline.store.runs import RunWriter
from tests.cli import fcnpipe, fcnpipe_in_process
from tests.rows import runs_row

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("train-cli") / "shapes")
    write_synthetic(root, num_images=8, size=32)
    return root


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model", "fcn4s"],
            "model.head: Input should be 'fcn32s', 'fcn16s' or 'fcn8s' (got 'fcn4s')",
        ),
        (["--backbone", "vgg19"], "(got 'vgg19')"),
        (["--num-classes", "9"], f"does not match the dataset's {len(CLASS_NAMES)} classes"),
        (["--precision", "fp8"], "compute.precision: Input should be"),
        (["--init-from", "/nonexistent/model"], "no model card at /nonexistent/model"),
        (["--backbone-weights", "/nonexistent/w.pt"], "/nonexistent/w.pt: no such file"),
        (["--val-split", "train"], "train and val split are both 'train'"),
        (["--run-id", "9lives"], "run id"),
    ],
)
def test_bad_config_fails_before_ray_starts(
    shapes: str, tmp_path: Path, args: list[str], message: str
) -> None:
    # fcnpipe_in_process also fails the test should the command start Ray.
    result = fcnpipe_in_process("train", shapes, "--output", str(tmp_path / "out"), *args)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_missing_dataset_and_committed_run(shapes: str, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    missing = fcnpipe("train", str(tmp_path / "nothing"), "--output", out, timeout=120)
    assert missing.returncode == 2 and "no dataset at" in missing.stderr

    done = RunWriter(out, "done", "train")
    done.write("runs", [runs_row("train", 0.5)])
    done.commit()
    again = fcnpipe("train", shapes, "--output", out, "--run-id", "done", timeout=120)
    assert again.returncode == 2
    assert "already committed" in again.stderr and "--overwrite" in again.stderr
    assert "Ray instance" not in again.stdout + again.stderr
