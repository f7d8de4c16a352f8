"""``fcnpipe query``, ``runs``, ``report`` and ``show`` as a user runs them.

The output root comes from :mod:`tests.results` (a train run, a segment run with known best
and worst images, and a crashed run that must stay invisible).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from fcn.synthetic import CLASS_NAMES
from tests.cli import fcnpipe
from tests.results import (
    BROKEN_ID,
    SEGMENT_RUN,
    TRAIN_RUN,
    UNCOMMITTED_RUN,
    BuiltResults,
    build_results,
)

pytestmark = pytest.mark.e2e

SIZE = 64


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> BuiltResults:
    return build_results(str(tmp_path_factory.mktemp("results")), size=SIZE)


def _ok(*args: str) -> str:
    result = fcnpipe(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_lists_the_result_commands() -> None:
    out = _ok("--help")
    for command in ("query", "runs", "report", "show"):
        assert command in out


def test_runs_lists_committed_runs(built: BuiltResults) -> None:
    out = _ok("runs", built.out)
    assert TRAIN_RUN in out and SEGMENT_RUN in out and UNCOMMITTED_RUN not in out
    assert out.index(TRAIN_RUN) < out.index(SEGMENT_RUN)  # oldest first
    segment_line = next(line for line in out.splitlines() if SEGMENT_RUN in line)
    assert f"{built.run_scores['mean_iou']:.3f}" in segment_line


def test_query_as_csv_json_parquet_and_table(built: BuiltResults, tmp_path: Path) -> None:
    sql = (
        'SELECT class_id, sum(intersection) / sum("union") AS iou FROM class_metrics '
        "GROUP BY class_id ORDER BY class_id"
    )
    rows = list(csv.DictReader(io.StringIO(_ok("query", built.out, sql, "--format", "csv"))))
    present = [(i, v) for i, v in enumerate(built.class_iou) if v is not None]
    assert [int(r["class_id"]) for r in rows] == [i for i, _ in present]
    for row, (_, expected) in zip(rows, present, strict=True):
        assert float(row["iou"]) == pytest.approx(expected, abs=1e-12)

    records = json.loads(_ok("query", built.out, sql, "--format", "json"))
    assert [r["class_id"] for r in records] == [i for i, _ in present]

    target = tmp_path / "iou.parquet"  # the format from the suffix
    assert "wrote" in _ok("query", built.out, sql, "--out", str(target))
    assert pq.read_table(target).column("class_id").to_pylist() == [i for i, _ in present]

    table = _ok("query", built.out, "SELECT run_id, kind FROM runs ORDER BY run_id")
    assert SEGMENT_RUN in table and TRAIN_RUN in table and "2 rows" in table


def test_report_prints_metrics_and_writes_html(built: BuiltResults, tmp_path: Path) -> None:
    html = tmp_path / "report.html"
    out = _ok("report", built.out, SEGMENT_RUN, "--html", str(html), "--images", "2")
    for words in ("pixel acc", "mean acc", "mean IoU", "f.w. IoU", *CLASS_NAMES):
        assert words in out
    assert f"{built.run_scores['mean_iou']:.3f}" in out
    assert f"training  {TRAIN_RUN}: 3 epochs" in out
    worst = next(line for line in out.splitlines() if line.startswith("worst"))
    assert worst.index(built.wrong) < worst.index(built.half)
    assert str(html) in out
    text = html.read_text()
    assert 'id="class-iou-chart"' in text and text.count('class="overlay"') == 4


def test_show_writes_the_overlay(built: BuiltResults, tmp_path: Path) -> None:
    target = tmp_path / "overlay.png"
    out = _ok("show", built.out, SEGMENT_RUN, built.wrong, "--out", str(target))
    assert "image | ground truth | prediction" in out and "mean IoU 0.000" in out
    with Image.open(target) as png:
        assert png.format == "PNG" and png.size == (3 * SIZE, SIZE)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("report", "{out}", "segment-nope"), ["'segment-nope'", SEGMENT_RUN, "fcnpipe runs"]),
        (("report", "{out}", UNCOMMITTED_RUN), [UNCOMMITTED_RUN, TRAIN_RUN]),
        (("show", "{out}", "segment-nope", "x", "--out", "{tmp}/x.png"), ["'segment-nope'"]),
        (("runs", "{empty}"), ["no committed runs", "{empty}"]),
        (("query", "{empty}", "SELECT 1"), ["no committed runs"]),
        (("report", "{empty}", SEGMENT_RUN), ["no committed runs"]),
        (("query", "{out}", "SELEC * FROM runs"), ["query failed", "syntax error", "SELEC"]),
        (("query", "{out}", "SELECT * FROM predictionz"), ["predictionz", "views: predictions"]),
        (("query", "{out}", "SELECT nope FROM runs"), ["nope", "not found"]),
        (("query", "{out}", "SELECT 1", "--format", "parquet"), ["--out"]),
        (("query", "{out}", "SELECT 1", "--out", "{tmp}/x.txt"), ["--format"]),
        (
            ("show", "{out}", SEGMENT_RUN, "nope", "--out", "{tmp}/x.png"),
            ["'nope'", "fcnpipe query"],
        ),
        (
            ("show", "{out}", SEGMENT_RUN, BROKEN_ID, "--out", "{tmp}/x.png"),
            ["failed", "truncated"],
        ),
        (("show", "{out}", TRAIN_RUN, "x", "--out", "{tmp}/x.png"), ["no predictions"]),
    ],
    ids=[
        "unknown-run",
        "uncommitted-run",
        "show-unknown-run",
        "runs-empty-root",
        "query-empty-root",
        "report-empty-root",
        "sql-syntax",
        "sql-unknown-table",
        "sql-unknown-column",
        "parquet-without-out",
        "unknown-suffix",
        "unknown-image",
        "failed-image",
        "train-run-has-no-images",
    ],
)
def test_bad_input_is_one_line_no_traceback(
    built: BuiltResults, tmp_path: Path, args: tuple[str, ...], expected: list[str]
) -> None:
    places = {"out": built.out, "empty": str(tmp_path / "empty"), "tmp": str(tmp_path)}
    result = fcnpipe(*(a.format(**places) for a in args))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for words in expected:
        assert words.format(**places) in lines[0]
    assert not (tmp_path / "x.png").exists()
