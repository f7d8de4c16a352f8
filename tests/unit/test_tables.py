"""pipeline.tables and pipeline.store without storage: schemas and their errors, run ids,
which catalog an output root uses. The writers, readers and the commit protocol on local disk
and a real S3 server: ``tests/integration/test_tables.py``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from pipeline.errors import ConfigError
from pipeline.storage import StorageOptions, resolve
from pipeline.store.catalog import arrow_schema, catalog_info
from pipeline.store.files import TableTarget, TableWriter
from pipeline.store.runs import RunWriter
from pipeline.tables import (
    TABLES,
    SchemaError,
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
    target = TableTarget(
        table="predictions",
        run_id="segment-x",
        data_uri="/nonexistent-root",
        schema=arrow_schema("predictions"),
    )
    writer = TableWriter(target)
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


def test_catalog_of_an_output_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.delenv("FCNPIPE_CATALOG", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    # Embedded: inside a local root; beside an s3:// one, on this machine.
    local = catalog_info(resolve(str(tmp_path / "out")))
    assert local.embedded == str(tmp_path / "out" / "_catalog" / "catalog.db")
    assert local.properties == {
        "type": "sql",
        "uri": f"sqlite:///{tmp_path}/out/_catalog/catalog.db",
        "warehouse": f"file://{tmp_path}/out",
    }
    assert local.identifiers["predictions"] == "fcnpipe.predictions"
    s3 = catalog_info(resolve("s3://bucket/a/out", StorageOptions(s3_endpoint="http://h:9000")))
    assert s3.embedded == f"{tmp_path}/data/fcnpipe/catalogs/s3/h_9000/bucket/a/out/catalog.db"
    assert s3.properties["warehouse"] == "s3://bucket/a/out"
    assert s3.properties["s3.endpoint"] == "http://h:9000"
    assert s3.properties["s3.force-virtual-addressing"] == "false"
    # Named by URI (option or environment): kind by scheme, properties from the query.
    rest = catalog_info(
        resolve(
            "s3://bucket/out",
            StorageOptions(catalog="https://cat.example/api/catalog?warehouse=wh&namespace=prod"),
        )
    )
    assert rest.properties["type"] == "rest" and rest.embedded is None
    assert rest.properties["uri"] == "https://cat.example/api/catalog"
    assert rest.properties["warehouse"] == "wh" and rest.namespace == "prod"
    assert rest.identifier("runs") == "prod.runs"
    monkeypatch.setenv("FCNPIPE_CATALOG", "thrift://metastore:9083")
    hive = catalog_info(resolve(str(tmp_path / "out")))
    assert hive.properties == {"type": "hive", "uri": "thrift://metastore:9083"}
    named = catalog_info(resolve(str(tmp_path), StorageOptions(catalog="prod")))
    assert (named.name, named.properties) == ("prod", {})
    # Never a credential in the URI; the value is not echoed.
    for secret in ("https://user:hunter2@cat.example", "https://cat.example?token=hunter2"):
        with pytest.raises(ConfigError) as caught:
            StorageOptions(catalog=secret)
        assert "hunter2" not in str(caught.value)
    with pytest.raises(ConfigError, match="unknown catalog kind 'ftp'"):
        catalog_info(resolve(str(tmp_path), StorageOptions(catalog="ftp://x")))
