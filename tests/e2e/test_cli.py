"""The ``fcnpipe`` command as a user runs it: the installed console script, in a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fcn.palette import decode_label_png
from fcn.synthetic import CLASS_NAMES
from tests.cli import fcnpipe

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
    runs = sorted(path.stem for path in (workdir / "results" / "_committed").glob("*.json"))
    assert [run.split("-")[0] for run in runs] == ["segment", "train"]
    # The summary names both runs, the metrics, the example queries and the report.
    for text in (*runs, "mean IoU", "f.w. IoU", "fcnpipe query", "report.html", "target 0.8"):
        assert text in result.stdout, text
    assert (workdir / "report.html").stat().st_size > 1000
