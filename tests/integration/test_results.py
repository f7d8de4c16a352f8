"""pipeline.results: SQL over committed runs, run summaries, per-image scores, overlays, HTML.

The runs come from :mod:`tests.results`: a segment run whose predictions are exact for most
images, half wrong for one and wrong everywhere for another, a train run with training rows,
and a crashed run that was never committed.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fcn.palette import decode_label_png, overlay
from fcn.synthetic import CLASS_NAMES
from pipeline.data.decode import decode_image, decode_mask
from pipeline.results.html import overlay_panel, write_html_report
from pipeline.results.output import encode_result
from pipeline.results.reader import ImageNotFoundError, NoRunsError, QueryError, Results, query
from pipeline.storage import join, read_bytes, resolve
from pipeline.store.runs import RunWriter
from pipeline.tables import RunNotCommittedError
from tests.results import (
    BROKEN_ID,
    SEGMENT_RUN,
    T0,
    TRAIN_LOSS,
    TRAIN_RUN,
    UNCOMMITTED_RUN,
    VAL_MEAN_IOU,
    BuiltResults,
    build_results,
)

pytestmark = pytest.mark.integration

SIZE = 64


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> BuiltResults:
    return build_results(str(tmp_path_factory.mktemp("results")), size=SIZE)


@pytest.fixture(scope="module")
def results(built: BuiltResults) -> Results:
    return Results(built.out)


# ----------------------------------------------------------------------------- SQL


def test_queries_see_committed_runs_only(results: Results) -> None:
    runs = results.query("SELECT run_id FROM runs ORDER BY run_id")
    assert runs["run_id"].to_pylist() == sorted([SEGMENT_RUN, TRAIN_RUN])
    for table in ("predictions", "runs"):
        seen = results.query(f"SELECT DISTINCT run_id FROM {table}")["run_id"].to_pylist()
        assert UNCOMMITTED_RUN not in seen


def test_class_metrics_add_up_to_the_run_class_iou(built: BuiltResults, results: Results) -> None:
    per_class = results.query(
        """
        SELECT class_id, sum(intersection) / sum("union") AS iou
        FROM class_metrics WHERE run_id = ? GROUP BY class_id ORDER BY class_id
        """,
        [SEGMENT_RUN],
    ).to_pylist()
    stored = results.query("SELECT class_iou FROM runs WHERE run_id = ?", [SEGMENT_RUN])
    class_iou = stored["class_iou"][0].as_py()
    assert class_iou == built.class_iou
    present = [i for i, v in enumerate(built.class_iou) if v is not None]
    assert [row["class_id"] for row in per_class] == present
    for row in per_class:
        assert row["iou"] == pytest.approx(class_iou[row["class_id"]], abs=1e-12)


def test_module_query_reads_a_root(built: BuiltResults) -> None:
    table = query(built.out, "SELECT count(*) AS n FROM predictions")
    assert table.to_pylist() == [{"n": len(built.image_ids)}]


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELEC * FROM runs", r"syntax error at or near \"SELEC\""),
        (
            "SELECT * FROM predictionz",
            r"predictionz.*views: predictions_latest, predictions, class_metrics, runs",
        ),
        ("SELECT nope FROM runs", r"\"nope\" not found"),
        ("SELECT 'x'::INTEGER", r"Could not convert string 'x'"),
        ("   ", r"empty"),
    ],
)
def test_bad_sql_is_a_query_error_naming_the_problem(
    results: Results, sql: str, expected: str
) -> None:
    with pytest.raises(QueryError, match=expected) as caught:
        results.query(sql)
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert "\n" not in message and "LINE 1" not in message and "pg_" not in message


def test_a_root_without_committed_runs_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NoRunsError, match=re.escape(str(tmp_path / "nothing"))):
        Results(str(tmp_path / "nothing"))
    crashed = RunWriter(str(tmp_path / "crashed"), "segment-x", "segment")
    crashed.write(
        "errors", [{"image_uri": "a.jpg", "stage": "read", "error_type": "E", "message": "m"}]
    )
    crashed.flush()
    with pytest.raises(NoRunsError, match="no committed runs"):
        Results(str(tmp_path / "crashed"))


def test_an_unknown_run_names_the_runs_there(results: Results) -> None:
    with pytest.raises(RunNotCommittedError) as caught:
        results.summary("segment-nope")
    message = str(caught.value)
    assert "'segment-nope'" in message
    assert SEGMENT_RUN in message and TRAIN_RUN in message
    assert "fcnpipe runs" in message
    with pytest.raises(RunNotCommittedError, match=UNCOMMITTED_RUN):
        results.summary(UNCOMMITTED_RUN)


# ----------------------------------------------------------------------------- runs and scores


def test_runs_lists_every_committed_run_newest_last(built: BuiltResults, results: Results) -> None:
    runs = results.runs().to_pylist()
    assert [r["run_id"] for r in runs] == [TRAIN_RUN, SEGMENT_RUN]
    train, segment = runs
    assert train["kind"] == "train" and segment["kind"] == "segment"
    assert segment["num_images"] == len(built.image_ids) and segment["num_errors"] == 1
    assert segment["mean_iou"] == pytest.approx(built.run_scores["mean_iou"])
    assert segment["input_uri"] == built.dataset
    assert train["model_uri"] == built.model_uri


def test_summary_has_the_scores_and_the_training_run(built: BuiltResults, results: Results) -> None:
    summary = results.summary(SEGMENT_RUN)
    assert summary.kind == "segment"
    assert summary.class_names == CLASS_NAMES
    assert list(summary.class_iou) == built.class_iou
    for key, value in built.run_scores.items():
        assert summary.scores[key] == pytest.approx(value)
    assert summary.num_images == len(built.image_ids) and summary.num_errors == 1
    assert summary.finished_at == T0.replace(minute=41)
    # The segment run names the model as "file://.../" : still the train run's model.
    assert summary.training_run_id == TRAIN_RUN
    history = results.training(SEGMENT_RUN)
    assert history["epoch"].to_pylist() == [0, 1, 2]
    assert history["train_loss"].to_pylist() == list(TRAIN_LOSS)
    assert history["val_mean_iou"].to_pylist() == list(VAL_MEAN_IOU)
    assert results.summary(TRAIN_RUN).training_run_id == TRAIN_RUN


def test_image_scores_rank_best_and_worst(built: BuiltResults, results: Results) -> None:
    scores = results.image_scores(SEGMENT_RUN)
    by_id = {r["image_id"]: r for r in scores.to_pylist()}
    assert set(by_id) == set(built.image_ids)
    for image_id, expected in built.image_mean_iou.items():
        assert by_id[image_id]["mean_iou"] == pytest.approx(expected)
    assert by_id[built.wrong]["mean_iou"] == 0.0 and by_id[built.wrong]["pixel_acc"] == 0.0
    assert 0.0 < by_id[built.half]["mean_iou"] < 1.0
    best, worst = results.best_and_worst(SEGMENT_RUN, 2)
    assert all(s.image_id in built.exact and s.mean_iou == 1.0 for s in best)
    assert [s.image_id for s in worst] == [built.wrong, built.half]
    # Fewer images than asked for: each image shows once.
    best, worst = results.best_and_worst(SEGMENT_RUN, 10)
    assert sorted(s.image_id for s in [*best, *worst]) == sorted(built.image_ids)


# ----------------------------------------------------------------------------- overlays


def _image_and_mask(built: BuiltResults, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    image = decode_image(read_bytes(join(built.dataset, "JPEGImages", f"{image_id}.jpg")))
    mask = decode_mask(
        read_bytes(join(built.dataset, "SegmentationClass", f"{image_id}.png")),
        height=SIZE,
        width=SIZE,
        num_classes=None,
    )
    return image, mask


def test_overlay_panel_is_image_ground_truth_prediction(
    built: BuiltResults, results: Results
) -> None:
    prediction = results.query(
        "SELECT label_map FROM predictions WHERE run_id = ? AND image_id = ?",
        [SEGMENT_RUN, built.wrong],
    )["label_map"][0].as_py()
    label = decode_label_png(prediction)
    image, mask = _image_and_mask(built, built.wrong)

    panel = overlay_panel(Results(built.out), SEGMENT_RUN, built.wrong, alpha=0.6)
    assert panel.has_ground_truth and panel.image_id == built.wrong
    assert panel.mean_iou == 0.0
    assert panel.pixels.shape == (SIZE, 3 * SIZE, 3) and panel.pixels.dtype == np.uint8
    left, middle, right = np.split(panel.pixels, 3, axis=1)
    np.testing.assert_array_equal(left, image)
    np.testing.assert_array_equal(middle, overlay(image, mask, 0.6))
    np.testing.assert_array_equal(right, overlay(image, label, 0.6))
    assert not np.array_equal(middle, right)  # this image is predicted wrong

    exact = overlay_panel(results, SEGMENT_RUN, built.exact[0])
    _, middle, right = np.split(exact.pixels, 3, axis=1)
    labelled = _image_and_mask(built, built.exact[0])[1] != 255
    np.testing.assert_array_equal(middle[labelled], right[labelled])

    png = Image.open(io.BytesIO(panel.to_png()))
    assert png.format == "PNG" and png.size == (3 * SIZE, SIZE)
    np.testing.assert_array_equal(np.asarray(png.convert("RGB")), panel.pixels)


def test_overlay_without_a_mask_is_image_and_prediction(
    built: BuiltResults, tmp_path: Path
) -> None:
    # A segment run over a folder of images (layout "images": no masks).
    images = tmp_path / "photos"
    shutil.copytree(Path(built.dataset) / "JPEGImages", images)
    image_id = built.exact[0]
    label = np.zeros((SIZE, SIZE), np.uint8)
    label[10:30, 5:50] = 2
    out = str(tmp_path / "out")
    run = RunWriter(out, "segment-photos", "segment")
    run.write(
        "predictions",
        [
            {
                "image_id": image_id,
                "image_uri": str(images / f"{image_id}.jpg"),
                "height": SIZE,
                "width": SIZE,
                "label_map": _png(label),
                "class_pixel_counts": np.bincount(label.ravel(), minlength=6).tolist(),
                "model_uri": built.model_uri,
            }
        ],
    )
    run.write(
        "runs",
        [
            {
                "kind": "segment",
                "input_uri": str(images),
                "model_uri": built.model_uri,
                "num_images": 1,
                "num_errors": 0,
                "class_names": list(CLASS_NAMES),
                "started_at": T0,
                "finished_at": T0,
            }
        ],
    )
    run.commit()
    panel = overlay_panel(Results(out), "segment-photos", image_id)
    assert not panel.has_ground_truth and panel.mean_iou is None
    assert panel.pixels.shape == (SIZE, 2 * SIZE, 3)
    image = decode_image((images / f"{image_id}.jpg").read_bytes())
    np.testing.assert_array_equal(panel.pixels[:, :SIZE], image)
    np.testing.assert_array_equal(panel.pixels[:, SIZE:], overlay(image, label, 0.6))

    html = write_html_report(Results(out), "segment-photos", str(tmp_path / "photos.html"))
    text = Path(html).read_text()
    assert text.count('class="overlay"') == 1 and "No per-image scores" in text


def _png(label: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(label).save(buf, format="PNG")
    return buf.getvalue()


def test_show_names_an_unknown_or_failed_image(built: BuiltResults, results: Results) -> None:
    with pytest.raises(ImageNotFoundError, match=r"'nope'.*" + SEGMENT_RUN):
        overlay_panel(results, SEGMENT_RUN, "nope")
    with pytest.raises(ImageNotFoundError, match=r"failed.*decode_image.*truncated"):
        overlay_panel(results, SEGMENT_RUN, BROKEN_ID)
    with pytest.raises(ImageNotFoundError, match=r"no predictions.*train run"):
        overlay_panel(results, TRAIN_RUN, built.exact[0])


# ----------------------------------------------------------------------------- output formats


def test_csv_json_and_parquet_output(built: BuiltResults, results: Results) -> None:
    table = results.query(
        """
        SELECT r.run_id, r.class_iou, r.finished_at, p.image_id, p.label_map
        FROM runs r JOIN predictions p USING (run_id)
        WHERE p.image_id = ?
        """,
        [built.wrong],
    )
    assert table.num_rows == 1

    rows = list(csv.DictReader(io.StringIO(encode_result(table, "csv").decode())))
    assert len(rows) == 1
    assert rows[0]["run_id"] == SEGMENT_RUN and rows[0]["image_id"] == built.wrong
    assert json.loads(rows[0]["class_iou"]) == built.class_iou
    assert rows[0]["finished_at"].startswith("2026-11-21")
    label = decode_label_png(base64.b64decode(rows[0]["label_map"]))
    assert label.shape == (SIZE, SIZE)

    records = json.loads(encode_result(table, "json"))
    assert records == [
        {
            "run_id": SEGMENT_RUN,
            "class_iou": built.class_iou,
            "finished_at": "2026-11-21T06:41:00+00:00",
            "image_id": built.wrong,
            "label_map": rows[0]["label_map"],
        }
    ]

    back = pq.read_table(io.BytesIO(encode_result(table, "parquet")))
    assert back.equals(table)


def test_json_output_has_null_for_nan_and_numbers_for_sums(results: Results) -> None:
    table = results.query("SELECT sum(gt_pixels) AS n, 'nan'::DOUBLE AS x FROM class_metrics")
    assert pa.types.is_decimal(table.schema.field("n").type)  # DuckDB sums are HUGEINT
    [record] = json.loads(encode_result(table, "json"))
    assert isinstance(record["n"], int) and record["n"] > 0 and record["x"] is None


# ----------------------------------------------------------------------------- HTML


def _data_uri_pngs(text: str) -> list[Image.Image]:
    found = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in found]


def test_html_report_is_self_contained(built: BuiltResults, tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    written = write_html_report(Results(built.out), SEGMENT_RUN, str(target), num_images=2)
    assert resolve(written).uri == str(target)
    text = target.read_text()
    assert text.startswith("<!DOCTYPE html>")
    # Nothing fetched from elsewhere: no scripts, no remote sources or styles.
    assert "<script" not in text.lower()
    assert not re.search(r"(src|href)=\"(?!data:|#)", text)
    assert "url(" not in text and "@import" not in text
    assert SEGMENT_RUN in text and built.dataset in text
    assert f"{built.run_scores['mean_iou']:.3f}" in text

    chart = re.search(r'<svg[^>]*id="class-iou-chart".*?</svg>', text, re.S)
    assert chart is not None
    assert chart.group(0).count("<rect") >= sum(v is not None for v in built.class_iou)
    for name in CLASS_NAMES:
        assert name in chart.group(0)

    curves = re.search(r'id="training".*?</section>', text, re.S)
    assert curves is not None and curves.group(0).count("<polyline") == 2
    assert TRAIN_RUN in curves.group(0)

    best = re.search(r'id="best-images".*?</section>', text, re.S)
    worst = re.search(r'id="worst-images".*?</section>', text, re.S)
    assert best is not None and worst is not None
    assert best.group(0).count('class="overlay"') == 2
    assert worst.group(0).count('class="overlay"') == 2
    assert all(f'data-image-id="{i}"' in worst.group(0) for i in (built.wrong, built.half))
    assert all(
        re.findall(r'data-image-id="([^"]+)"', best.group(0))[i] in built.exact for i in (0, 1)
    )

    pngs = _data_uri_pngs(text)
    assert len(pngs) == 4 and all(p.size == (3 * SIZE, SIZE) for p in pngs)
    assert BROKEN_ID in text  # the errors section


def test_html_report_of_a_train_run_has_curves_and_no_overlays(
    built: BuiltResults, tmp_path: Path
) -> None:
    text = Path(
        write_html_report(Results(built.out), TRAIN_RUN, str(tmp_path / "t.html"))
    ).read_text()
    assert 'id="class-iou-chart"' in text and 'id="training-curves"' in text
    assert 'class="overlay"' not in text
    assert math.isclose(VAL_MEAN_IOU[-1], 0.72) and "0.720" in text


# ----------------------------------------------------------------------------- S3


def test_query_summary_and_overlay_on_s3(s3_env: object, bucket: str, tmp_path: Path) -> None:
    built = build_results(f"s3://{bucket}/r", num_images=4, size=SIZE)
    results = Results(built.out)
    assert results.run_ids == sorted([SEGMENT_RUN, TRAIN_RUN])
    count = results.query("SELECT count(*) AS n FROM predictions")["n"][0].as_py()
    assert count == 4
    assert results.summary(SEGMENT_RUN).training_run_id == TRAIN_RUN
    panel = overlay_panel(results, SEGMENT_RUN, built.wrong)
    assert panel.has_ground_truth and panel.pixels.shape == (SIZE, 3 * SIZE, 3)
    target = f"s3://{bucket}/reports/r.html"
    assert write_html_report(Results(built.out), SEGMENT_RUN, target) == target
    assert b'id="class-iou-chart"' in read_bytes(target)
