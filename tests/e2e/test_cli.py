"""The ``fcnpipe`` command as a user runs it: the installed console script, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fcn.palette import decode_label_png
from fcn.synthetic import CLASS_NAMES
from pipeline.store.read import committed_runs
from tests.cli import fcnpipe, fcnpipe_in_process

pytestmark = pytest.mark.e2e


def test_help_lists_the_commands() -> None:
    result = fcnpipe("--help")
    assert result.returncode == 0, result.stderr
    for command in ("demo", "models", "dataset", "bench"):
        assert command in result.stdout


def test_models_lists_heads_and_backbones() -> None:
    result = fcnpipe("models")
    assert result.returncode == 0, result.stderr
    assert "fcn8s" in result.stdout and "resnet18" in result.stdout and "vgg16" in result.stdout


def test_dataset_synth_index_info(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    made = fcnpipe("dataset", "synth", str(root), "--num-images", "10", "--size", "40")
    assert made.returncode == 0, made.stderr
    assert "wrote 10 images" in made.stdout
    assert (root / "classes.txt").read_text().split() == list(CLASS_NAMES)
    assert len(list((root / "JPEGImages").glob("*.jpg"))) == 10
    mask = decode_label_png((root / "SegmentationClass" / "shapes_000000.png").read_bytes())
    assert mask.shape == (40, 40)

    indexed = fcnpipe("dataset", "index", str(root))
    assert indexed.returncode == 0, indexed.stderr
    manifest = pq.read_table(root / "manifest.parquet")
    assert manifest.num_rows == 10
    assert {"image_uri", "mask_uri", "split", "bytes"} <= set(manifest.column_names)

    info = fcnpipe("dataset", "info", str(root / "manifest.parquet"), "--json")
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert summary["num_images"] == 10 and summary["num_with_masks"] == 10
    assert summary["splits"] == {"train": 8, "val": 2}
    assert summary["class_names"] == list(CLASS_NAMES)


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    # Brackets are legal in paths and must not be read as terminal markup.
    missing = tmp_path / "[train]" / "nothing-here"
    result = fcnpipe("dataset", "info", str(missing))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no images found" in lines[0] and str(missing) in lines[0]


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """The README's first command, on a small budget: Prefect (ephemeral), Ray, two runs."""
    workdir = tmp_path / "demo"
    result = fcnpipe(
        "demo", "--workdir", str(workdir), "--num-images", "16", "--size", "48", "--epochs", "1",
        env={"PREFECT_HOME": str(tmp_path / "prefect")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / "bucket" / "shapes" / "classes.txt").exists()
    runs = committed_runs(str(workdir / "results"))
    assert [run.split("-")[0] for run in runs] == ["segment", "train"]
    # The summary names both runs, the metrics, the example queries and the report.
    for text in (*runs, "mean IoU", "f.w. IoU", "fcnpipe query", "report.html", "target 0.8"):
        assert text in result.stdout, text
    assert (workdir / "report.html").stat().st_size > 1000
    # Output to a file (as here): the job's lines, sparse progress and the summary, nothing
    # of Ray's or Prefect's own, within the budget of 60 lines.
    printed = (result.stdout + result.stderr).splitlines()
    assert len(printed) <= 60, "\n".join(printed)
    assert not [line for line in printed if "pid=" in line or " INFO " in line], printed
    assert any(line.startswith("training: 100% ") for line in printed), printed
    # Ray's and Prefect's lines are in the log file whose path came first.
    (log,) = (workdir / "_logs").glob("demo-*.log")
    assert printed[0] == f"log: {log}", printed[:3]
    logged = log.read_text()
    assert "(RayTrainWorker pid=" in logged and "prefect" in logged, logged[-3000:]


def test_a_bug_keeps_its_traceback_and_exits_1(tmp_path: Path) -> None:
    # A KeyError inside a command is a bug, not bad input: Python's traceback, exit code 1.
    script = (
        "import sys, pipeline.data.layouts as layouts\n"
        "def broken(*args, **kwargs): return {}['layout']\n"
        "layouts.dataset_info = broken\n"
        "from flows.cli import main\n"
        f"sys.argv = ['fcnpipe', 'dataset', 'info', {str(tmp_path)!r}]\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" in result.stderr and "KeyError: 'layout'" in result.stderr


def test_an_unavailable_service_is_one_line_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.data.layouts as layouts
    from pipeline.storage import StorageUnavailable

    def down(*args: object, **kwargs: object) -> None:
        raise StorageUnavailable("s3://bucket: the endpoint did not answer after 8 attempts")

    monkeypatch.setattr(layouts, "dataset_info", down)
    result = fcnpipe_in_process("dataset", "info", str(tmp_path))
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "did not answer after 8 attempts" in lines[0]
