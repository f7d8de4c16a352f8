"""pipeline.tables without storage: schemas and their errors, run ids. The writers, readers
and the commit protocol on local disk and a real S3 server: ``tests/integration/test_tables.py``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from pipeline.tables import (
    TABLES,
    RunWriter,
    SchemaError,
    TableWriter,
    conform,
    new_run_id,
    validate_run_id,
)
from tests.rows import LABEL_MAP, predictions, runs_row

pytestmark = pytest.mark.unit


def test_schema_errors_name_the_table_and_column() -> None:
    rows = [{**row, "run_id": "segment-x"} for row in predictions(["a"])]
    with pytest.raises(SchemaError, match=r"'predictions'.*'height'"):
        conform("predictions", [{**rows[0], "height": "tall"}])
    with pytest.raises(SchemaError, match=r"'predictions'.*'height'"):
        conform("predictions", [{**rows[0], "height": 2**40}])
    with pytest.raises(SchemaError, match=r"'predictions'.*'label_map'.*missing"):
        conform("predictions", [{k: v for k, v in rows[0].items() if k != "label_map"}])
    with pytest.raises(SchemaError, match=r"'predictions'.*'labelmap'.*unknown"):
        conform("predictions", [{**rows[0], "labelmap": b""}])
    with pytest.raises(SchemaError, match=r"'errors'.*'stage'.*null"):
        conform(
            "errors",
            [{"run_id": "r", "image_uri": "u", "stage": None, "error_type": "t", "message": "m"}],
        )
    with pytest.raises(SchemaError, match=r"'runs'.*'started_at'.*naive"):
        conform(
            "runs", [{**runs_row("train", 0.5), "run_id": "r", "started_at": datetime(2026, 1, 1)}]
        )
    with pytest.raises(SchemaError, match=r"'training'.*'epoch'"):
        conform("training", pa.table({"run_id": ["r"], "epoch": pa.array(["one"])}))
    with pytest.raises(SchemaError, match=r"'training'.*'run_id'.*missing"):
        conform("training", [{"epoch": 1}])
    with pytest.raises(ValueError, match="unknown result table 'prediction'"):
        conform("prediction", rows)
    writer = TableWriter("/nonexistent-root", "segment-x", "predictions")
    with pytest.raises(SchemaError, match=r"'run_id'.*segment-y"):
        writer.write([{**rows[0], "run_id": "segment-y"}])

    # Columns as numpy arrays (a Ray Data batch) and NaN -> null where the contract says so.
    metrics = conform(
        "class_metrics",
        {
            "run_id": np.array(["r", "r"]),
            "image_id": np.array(["a", "a"]),
            "class_id": np.array([0, 1]),
            "class_name": ["bg", "fg"],
            "gt_pixels": np.array([0, 4]),
            "pred_pixels": np.array([0, 4]),
            "intersection": np.array([0, 4]),
            "union": np.array([0, 4]),
            "iou": np.array([np.nan, 1.0]),
        },
    )
    assert metrics.schema == TABLES["class_metrics"]
    assert metrics["iou"].to_pylist() == [None, 1.0]
    batch = {k: np.array([v] * 2, dtype=object) for k, v in rows[0].items()}
    batch["class_pixel_counts"] = np.array([[3, 17], [0, 20]])  # (rows, classes)
    batch["height"] = np.array([4, 4], dtype=np.int64)
    preds = conform("predictions", batch)
    assert preds["class_pixel_counts"].to_pylist() == [[3, 17], [0, 20]]
    assert preds["label_map"].to_pylist() == [LABEL_MAP] * 2


@pytest.mark.parametrize(
    "bad", ["", "..", "a/b", "../x", "a..b", "-x", ".hidden", "x y", "r=1", "1"]
)
def test_bad_run_ids_are_rejected(bad: str, tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="invalid run id"):
        validate_run_id(bad)
    with pytest.raises(ValueError, match="invalid run id"):
        RunWriter(str(tmp_path), bad, "segment")


def test_new_run_ids_are_valid_and_distinct() -> None:
    ids = {new_run_id("segment") for _ in range(20)}
    assert len(ids) == 20
    for run_id in ids:
        assert validate_run_id(run_id).startswith("segment-")
    with pytest.raises(ValueError, match="kind"):
        new_run_id("predict")  # type: ignore[arg-type]
