"""Looking at results: SQL over the result tables, run summaries, per-image scores, overlays
and a self-contained HTML report.

Usage:
    fcnpipe runs OUT
    fcnpipe query OUT "SELECT run_id, kind, mean_iou FROM runs" --format csv
    fcnpipe report OUT RUN_ID --html report.html
    fcnpipe show OUT RUN_ID IMAGE_ID --out overlay.png

Everything here reads *committed* runs only, through the readers of :mod:`pipeline.tables`:
DuckDB views ``predictions``, ``class_metrics``, ``runs``, ``errors`` and ``training`` over the
Parquet files the commit markers list, on local disk or S3 alike.

- A run's scores come from its ``runs`` row; a per-image mean IoU is the mean of the image's
  ``class_metrics.iou`` (classes in its ground truth or prediction, as the paper's mean IoU
  over a split), and its pixel accuracy is ``sum(intersection) / sum(gt_pixels)``.
- The training curves of a segment run are the ``training`` rows of the train run whose
  ``runs.model_uri`` is the segment run's model (URIs compared after :func:`resolve`).
- An overlay panel is image | ground truth | prediction, side by side at the image's size
  (image | prediction where the input has no mask): the image from ``predictions.image_uri``,
  the prediction from ``label_map``, the mask from the manifest of ``runs.input_uri``.

Example::

    with Results("s3://bucket/out") as results:
        results.query("SELECT image_id, iou FROM class_metrics WHERE class_name = ?", ["disc"])
        best, worst = results.best_and_worst(run_id, 4)
    write_html_report("s3://bucket/out", run_id, "report.html")
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from PIL import Image
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from pipeline.decode import DecodeError, decode_image, decode_mask
from pipeline.storage import Location, StorageOptions, read_bytes, resolve, write_bytes
from pipeline.summary import PAPER_METRICS, print_class_iou, print_paper_table
from pipeline.tables import (
    TABLES,
    RunNotCommittedError,
    TableError,
    committed_runs,
    duckdb_connection,
    table_dataset,
)

if TYPE_CHECKING:
    import duckdb
    from rich.console import Console

__all__ = [
    "DEFAULT_ALPHA",
    "OUTPUT_FORMATS",
    "ImageNotFoundError",
    "ImageScore",
    "NoRunsError",
    "OutputFormat",
    "Panel",
    "QueryError",
    "Results",
    "RunSummary",
    "choose_format",
    "encode_result",
    "overlay_panel",
    "print_report",
    "print_result",
    "print_runs",
    "query",
    "render_html",
    "write_html_report",
]

DEFAULT_ALPHA = 0.6
"""Weight of the class colour in the ground-truth and prediction overlays."""

OutputFormat = Literal["table", "csv", "json", "parquet"]
"""How query results are written: a terminal table, or a file format."""
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)

_SUFFIX_FORMATS: dict[str, OutputFormat] = {".csv": "csv", ".json": "json", ".parquet": "parquet"}
_MAX_TABLE_ROWS = 200
_MAX_ERROR_ROWS = 20
_READ_THREADS = 8
_RUN_COLUMNS = (
    "run_id",
    "kind",
    "input_uri",
    "model_uri",
    "num_images",
    "num_errors",
    "pixel_acc",
    "mean_acc",
    "mean_iou",
    "fw_iou",
    "started_at",
    "finished_at",
    "images_per_s",
)


# ----------------------------------------------------------------------------- errors


class NoRunsError(TableError, LookupError):
    """An output root without a single committed run."""


class QueryError(TableError, ValueError):
    """SQL that DuckDB cannot parse, bind or run; the message says what is wrong."""


class ImageNotFoundError(TableError, LookupError):
    """An image id that has no prediction in the run (the message says why, where known)."""


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """One run's ``runs`` row, and where its training curves are."""

    run_id: str
    """The run."""
    kind: str
    """``train`` or ``segment``."""
    input_uri: str | None
    """The dataset (or images) the run read."""
    model_uri: str | None
    """The model it trained or used."""
    num_images: int
    """Images trained on (train) or segmented (segment)."""
    num_errors: int
    """Objects that failed."""
    scores: dict[str, float | None]
    """The paper's four metrics (:data:`pipeline.summary.PAPER_METRICS` keys); None: no masks."""
    class_names: tuple[str, ...]
    """Name per class id."""
    class_iou: tuple[float | None, ...]
    """IoU per class id (None where absent from ground truth and prediction); empty: no masks."""
    started_at: datetime
    """Start (UTC)."""
    finished_at: datetime
    """End (UTC)."""
    images_per_s: float | None
    """Throughput."""
    training_run_id: str | None
    """The train run of the model (this run for a train run); None where not under this root."""


@dataclass(frozen=True)
class ImageScore:
    """One image's scores in a run."""

    image_id: str
    """The image."""
    mean_iou: float | None
    """Mean IoU over the classes in its ground truth or prediction."""
    pixel_acc: float | None
    """Share of its labelled pixels predicted right."""


@dataclass(frozen=True, eq=False)
class Panel:
    """An overlay panel: image | ground truth | prediction (image | prediction without mask)."""

    image_id: str
    """The image."""
    pixels: np.ndarray
    """(H, 3W, 3) uint8 RGB, or (H, 2W, 3) without ground truth."""
    has_ground_truth: bool
    """Whether the middle part is the ground truth."""
    mean_iou: float | None
    """The image's mean IoU in the run; None where it has no mask."""

    @property
    def parts(self) -> str:
        """What the panel shows, left to right."""
        return (
            "image | ground truth | prediction" if self.has_ground_truth else "image | prediction"
        )

    def to_png(self) -> bytes:
        """The panel as PNG bytes."""
        buf = io.BytesIO()
        Image.fromarray(self.pixels).save(buf, format="PNG", optimize=True)
        return buf.getvalue()


# ----------------------------------------------------------------------------- reading


class Results:
    """The committed runs under one output root, opened for reading.

    Args:
        out_uri: The output root (path, ``file://``, ``s3://``).
        options: Storage options for a string URI.

    Raises:
        NoRunsError: No committed run under the root (the message names it).
    """

    def __init__(self, out_uri: str | Location, options: StorageOptions | None = None) -> None:
        self._root = resolve(out_uri, options)
        self.run_ids: list[str] = committed_runs(self._root)
        """Ids of the committed runs, sorted."""
        if not self.run_ids:
            raise NoRunsError(
                f"no committed runs under {self._root.uri}: give the --output root of "
                "`fcnpipe train` or `fcnpipe segment` (runs show up once they finish)"
            )
        self._con: duckdb.DuckDBPyConnection | None = None
        self._summaries: dict[str, RunSummary] = {}
        self._image_scores: dict[str, pa.Table] = {}
        self._masks: dict[str | None, dict[str, str | None]] = {}

    @property
    def out_uri(self) -> str:
        """The output root URI."""
        return self._root.uri

    def close(self) -> None:
        """Close the DuckDB connection."""
        if self._con is not None:
            self._con.close()
            self._con = None

    def __enter__(self) -> Results:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _connection(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            self._con = duckdb_connection(self._root, self.run_ids)
        return self._con

    def query(self, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
        """Run SQL over the views of the committed runs; the result as an Arrow table.

        Args:
            sql: DuckDB SQL over ``predictions``, ``class_metrics``, ``runs``, ``errors``,
                ``training``; the last statement's result is returned.
            params: Values for ``?`` placeholders.

        Raises:
            QueryError: Empty, malformed or failing SQL (one line naming the problem).
        """
        import duckdb

        if not sql.strip():
            raise QueryError('empty SQL query; e.g. "SELECT run_id, kind, mean_iou FROM runs"')
        try:
            relation = self._connection().sql(sql, params=list(params) if params else None)
            return pa.table({}) if relation is None else relation.to_arrow_table()
        except (duckdb.InternalException, duckdb.FatalException):
            raise  # DuckDB's own bugs: keep the traceback
        except duckdb.Error as exc:
            raise QueryError(_query_problem(exc)) from None

    def runs(self) -> pa.Table:
        """One row per committed run (its ``runs`` row, without per-class lists), oldest first."""
        return self.query(
            f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs ORDER BY finished_at, run_id"
        )

    def require(self, run_id: str) -> None:
        """Check that a run is committed here.

        Args:
            run_id: The run.

        Raises:
            RunNotCommittedError: It is not (the message lists the runs there).
        """
        if run_id in self.run_ids:
            return
        shown = self.run_ids[-8:]
        more = (
            f" and {len(self.run_ids) - len(shown)} more" if len(self.run_ids) > len(shown) else ""
        )
        raise RunNotCommittedError(
            f"no committed run {run_id!r} under {self._root.uri}; runs there: "
            f"{', '.join(shown)}{more} (`fcnpipe runs {self._root.uri}` lists them)"
        )

    def summary(self, run_id: str) -> RunSummary:
        """A run's ``runs`` row and the train run of its model.

        Args:
            run_id: A committed run.

        Raises:
            RunNotCommittedError: Unknown run.
            TableError: The run has no ``runs`` row.
        """
        if run_id in self._summaries:
            return self._summaries[run_id]
        self.require(run_id)
        rows = self.query("SELECT * FROM runs WHERE run_id = ?", [run_id]).to_pylist()
        if not rows:
            raise TableError(f"run {run_id!r} is committed but has no row in the runs table")
        row = rows[0]
        summary = RunSummary(
            run_id=run_id,
            kind=row["kind"],
            input_uri=row["input_uri"],
            model_uri=row["model_uri"],
            num_images=row["num_images"],
            num_errors=row["num_errors"],
            scores={key: row[key] for key in PAPER_METRICS},
            class_names=tuple(row["class_names"] or ()),
            class_iou=tuple(row["class_iou"] or ()),
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            images_per_s=row["images_per_s"],
            training_run_id=run_id if row["kind"] == "train" else self._train_run(row["model_uri"]),
        )
        self._summaries[run_id] = summary
        return summary

    def _train_run(self, model_uri: str | None) -> str | None:
        """The latest train run that exported ``model_uri``, if it is under this root."""
        if model_uri is None:
            return None
        wanted = self._canonical(model_uri)
        trained = self.query(
            "SELECT run_id, model_uri FROM runs WHERE kind = 'train' AND model_uri IS NOT NULL "
            "ORDER BY finished_at DESC"
        ).to_pylist()
        return next(
            (r["run_id"] for r in trained if self._canonical(r["model_uri"]) == wanted), None
        )

    def _canonical(self, uri: str) -> str:
        try:
            return resolve(uri, self._root.options).uri
        except (ValueError, ImportError):  # a scheme this machine cannot open: compare as typed
            return uri.rstrip("/")

    def training(self, run_id: str) -> pa.Table:
        """The training rows (epoch order) behind a run's model; no rows where unknown.

        Args:
            run_id: A committed run (train or segment).
        """
        train_run = self.summary(run_id).training_run_id
        return self.query(
            "SELECT epoch, train_loss, val_pixel_acc, val_mean_iou, lr, images_per_s "
            "FROM training WHERE run_id = ? ORDER BY epoch",
            [train_run],  # None: NULL, no rows
        )

    def image_scores(self, run_id: str) -> pa.Table:
        """Per-image scores of a run, best first: ``image_id``, ``mean_iou``, ``pixel_acc``,
        ``num_classes``. Only images with a mask have rows.

        Args:
            run_id: A committed run.
        """
        self.require(run_id)
        if run_id not in self._image_scores:
            self._image_scores[run_id] = self.query(
                """
                SELECT image_id,
                       avg(iou) AS mean_iou,
                       sum(intersection) / nullif(sum(gt_pixels), 0) AS pixel_acc,
                       count(*) AS num_classes
                FROM class_metrics WHERE run_id = ?
                GROUP BY image_id
                ORDER BY mean_iou DESC NULLS LAST, pixel_acc DESC NULLS LAST, image_id
                """,
                [run_id],
            )
        return self._image_scores[run_id]

    def best_and_worst(self, run_id: str, n: int) -> tuple[list[ImageScore], list[ImageScore]]:
        """The ``n`` best images (best first) and the ``n`` worst (worst first), by mean IoU.

        An image is in one list only: with fewer than ``2n`` scored images the worst list is
        shorter.

        Args:
            run_id: A committed run.
            n: Images per list.
        """
        if n < 1:
            raise ValueError(f"number of images must be >= 1, got {n}")
        rows = self.image_scores(run_id).select(["image_id", "mean_iou", "pixel_acc"])
        ranked = [ImageScore(**row) for row in rows.to_pylist()]
        best = ranked[:n]
        worst = ranked[max(n, len(ranked) - n) :][::-1]
        return best, worst

    def errors(self, run_id: str, limit: int | None = None) -> pa.Table:
        """A run's failed objects (``image_id``, ``image_uri``, ``stage``, ``error_type``,
        ``message``), by image URI.

        Args:
            run_id: A committed run.
            limit: At most this many rows.
        """
        self.require(run_id)
        sql = (
            "SELECT image_id, image_uri, stage, error_type, message FROM errors "
            "WHERE run_id = ? ORDER BY image_uri"
        )
        return self.query(sql + (f" LIMIT {int(limit)}" if limit is not None else ""), [run_id])

    def panel(self, run_id: str, image_id: str, *, alpha: float = DEFAULT_ALPHA) -> Panel:
        """One image's overlay panel (see :meth:`panels`).

        Args:
            run_id: A committed segment run.
            image_id: An image it segmented.
            alpha: Weight of the class colours.
        """
        return self.panels(run_id, [image_id], alpha=alpha)[0]

    def panels(
        self, run_id: str, image_ids: Sequence[str], *, alpha: float = DEFAULT_ALPHA
    ) -> list[Panel]:
        """Overlay panels, image | ground truth | prediction, in the order of ``image_ids``.

        Args:
            run_id: A committed segment run.
            image_ids: Images it segmented.
            alpha: Weight of the class colours.

        Raises:
            ImageNotFoundError: An image without a prediction in the run (the message says
                whether it failed, and how to list the run's images).
        """
        summary = self.summary(run_id)
        rows = (
            table_dataset(self._root, "predictions", [run_id])
            .to_table(
                columns=["image_id", "image_uri", "label_map"],
                filter=pc.field("image_id").isin(list(image_ids)),
            )
            .to_pylist()
        )
        found = {r["image_id"]: r for r in rows}
        missing = [i for i in image_ids if i not in found]
        if missing:
            raise ImageNotFoundError(self._missing_image(summary, missing[0]))
        from fcn.palette import decode_label_png, overlay  # imports torch: only here

        masks = self._mask_uris(summary.input_uri)
        scores = {
            r["image_id"]: r["mean_iou"]
            for r in self.image_scores(run_id).select(["image_id", "mean_iou"]).to_pylist()
        }
        options = self._root.options

        def fetch(image_id: str) -> tuple[bytes, bytes | None]:
            mask_uri = masks.get(image_id)
            image = read_bytes(resolve(found[image_id]["image_uri"], options))
            return image, None if mask_uri is None else read_bytes(resolve(mask_uri, options))

        # Concurrent reads: on object storage each one is a round trip.
        with ThreadPoolExecutor(max(1, min(_READ_THREADS, len(image_ids)))) as pool:
            fetched = list(pool.map(fetch, image_ids))
        panels = []
        for image_id, (image_bytes, mask_bytes) in zip(image_ids, fetched, strict=True):
            image = _decoded(found[image_id]["image_uri"], image_bytes)
            height, width = image.shape[:2]
            label = _fit(decode_label_png(found[image_id]["label_map"]), height, width)
            parts = [image]
            if mask_bytes is not None:
                try:
                    mask = decode_mask(mask_bytes, height=height, width=width, num_classes=None)
                except DecodeError as exc:
                    raise ValueError(f"{masks[image_id]}: {exc}") from None
                parts.append(overlay(image, mask, alpha))
            parts.append(overlay(image, label, alpha))
            panels.append(
                Panel(
                    image_id=image_id,
                    pixels=np.concatenate(parts, axis=1),
                    has_ground_truth=mask_bytes is not None,
                    mean_iou=scores.get(image_id),
                )
            )
        return panels

    def sample_ids(self, run_id: str, n: int) -> list[str]:
        """The first ``n`` image ids of a run's predictions, in id order.

        Args:
            run_id: A committed run.
            n: How many.
        """
        self.require(run_id)
        table = self.query(
            f"SELECT image_id FROM predictions WHERE run_id = ? ORDER BY image_id LIMIT {int(n)}",
            [run_id],
        )
        return [str(i) for i in table["image_id"].to_pylist()]

    def write_html(
        self, run_id: str, path: str, *, num_images: int = 4, alpha: float = DEFAULT_ALPHA
    ) -> str:
        """Write a run's self-contained HTML report (see :func:`render_html`).

        Args:
            run_id: A committed run.
            path: Where to write (path or URI; storage options as the output root's).
            num_images: Best and worst images shown.
            alpha: Weight of the class colours in the overlays.

        Returns:
            The URI written.
        """
        text = render_html(self, run_id, num_images=num_images, alpha=alpha)
        target = resolve(path, self._root.options)
        write_bytes(target, text.encode())
        return target.uri

    def _missing_image(self, summary: RunSummary, image_id: str) -> str:
        """Why ``image_id`` has no prediction in the run, in words."""
        run_id = summary.run_id
        count = self.query("SELECT count(*) AS n FROM predictions WHERE run_id = ?", [run_id])
        if not count["n"][0].as_py():
            what = "a train run" if summary.kind == "train" else f"a {summary.kind} run"
            return f"run {run_id!r} has no predictions ({what}); give a segment run"
        failed = self.query(
            "SELECT stage, error_type, message FROM errors WHERE run_id = ? AND image_id = ?",
            [run_id, image_id],
        ).to_pylist()
        if failed:
            f = failed[0]
            return (
                f"image {image_id!r} failed in run {run_id!r} ({f['stage']}: "
                f"{f['error_type']}: {f['message']}), so it has no prediction"
            )
        return (
            f"no image {image_id!r} in run {run_id!r}; list its images with: fcnpipe query "
            f"{self._root.uri} \"SELECT image_id FROM predictions WHERE run_id = '{run_id}'\""
        )

    def _mask_uris(self, input_uri: str | None) -> dict[str, str | None]:
        """image_id -> mask URI of the run's input (empty without an input)."""
        if input_uri is None:
            return {}
        if input_uri not in self._masks:
            from pipeline.datasets import load_manifest  # Ray Data: only where masks are looked up

            manifest = load_manifest(input_uri, options=self._root.options)
            self._masks[input_uri] = dict(
                zip(
                    manifest["image_id"].to_pylist(),
                    manifest["mask_uri"].to_pylist(),
                    strict=True,
                )
            )
        return self._masks[input_uri]


def query(
    out_uri: str | Location,
    sql: str,
    params: Sequence[Any] | None = None,
    *,
    options: StorageOptions | None = None,
) -> pa.Table:
    """Run SQL over the committed runs of an output root (see :meth:`Results.query`).

    Args:
        out_uri: The output root.
        sql: DuckDB SQL over the five views.
        params: Values for ``?`` placeholders.
        options: Storage options for a string URI.
    """
    with Results(out_uri, options) as results:
        return results.query(sql, params)


def overlay_panel(
    out_uri: str | Location,
    run_id: str,
    image_id: str,
    *,
    alpha: float = DEFAULT_ALPHA,
    options: StorageOptions | None = None,
) -> Panel:
    """One image's overlay panel: image | ground truth | prediction (see :meth:`Results.panels`).

    Args:
        out_uri: The output root.
        run_id: A committed segment run.
        image_id: An image it segmented.
        alpha: Weight of the class colours.
        options: Storage options for a string URI.
    """
    with Results(out_uri, options) as results:
        return results.panel(run_id, image_id, alpha=alpha)


def _decoded(uri: str, data: bytes) -> np.ndarray:
    try:
        return decode_image(data)
    except DecodeError as exc:
        raise ValueError(f"{uri}: {exc}") from None


def _fit(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """A label map at the image's size (nearest neighbour, for maps made at another size)."""
    if label.shape == (height, width):
        return label
    return np.asarray(Image.fromarray(label).resize((width, height), Image.Resampling.NEAREST))


def _query_problem(exc: Exception) -> str:
    """DuckDB's message on one line, without the caret diagram or misleading suggestions."""
    import duckdb

    kept: list[str] = []
    for line in (part.strip() for part in str(exc).splitlines()):
        if line.startswith("LINE ") or (line and set(line) <= {"^", " "}):
            break
        if line and not line.startswith("Did you mean"):
            kept.append(line)
    message = "; ".join(kept) or type(exc).__name__
    if isinstance(exc, duckdb.CatalogException):
        message += f" (views: {', '.join(TABLES)})"
    return f"query failed: {message}"


# ----------------------------------------------------------------------------- output


def choose_format(fmt: str | None, out: str | None) -> OutputFormat:
    """The output format: as given, else from ``out``'s suffix, else a table.

    Args:
        fmt: ``table``, ``csv``, ``json``, ``parquet`` or None.
        out: The output file, or None for standard output.

    Raises:
        ValueError: An unknown format, a table asked into a file, or Parquet without a file.
    """
    if fmt is None:
        suffix = "." + out.rsplit(".", 1)[-1].lower() if out is not None and "." in out else ""
        if out is not None and suffix not in _SUFFIX_FORMATS:
            raise ValueError(f"cannot tell the format of {out}: give --format csv, json or parquet")
        return _SUFFIX_FORMATS[suffix] if out is not None else "table"
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    if fmt == "table" and out is not None:
        raise ValueError(
            "--format table prints to the terminal; give csv, json or parquet with --out"
        )
    if fmt == "parquet" and out is None:
        raise ValueError("--format parquet needs --out PATH (Parquet is not for a terminal)")
    return fmt  # type: ignore[return-value]  # checked against OUTPUT_FORMATS above


def encode_result(table: pa.Table, fmt: Literal["csv", "json", "parquet"]) -> bytes:
    """A query result as file bytes.

    CSV and JSON (an array of objects) carry binary values (e.g. ``label_map``) as base64
    text and, in CSV, lists and structs as JSON text; NaN becomes null. Parquet keeps the
    Arrow types.

    Args:
        table: The result.
        fmt: ``csv``, ``json`` or ``parquet``.
    """
    if fmt == "parquet":
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return buf.getvalue()
    if fmt == "json":
        rows = [{k: _jsonable(v) for k, v in row.items()} for row in table.to_pylist()]
        return (json.dumps(rows, indent=1, allow_nan=False) + "\n").encode()
    if fmt == "csv":
        buf = io.BytesIO()
        pacsv.write_csv(_csv_ready(table), buf)
        return buf.getvalue()
    raise ValueError(f"no file format {fmt!r}; expected csv, json or parquet")


def _csv_ready(table: pa.Table) -> pa.Table:
    """Binary columns as base64, nested ones as JSON text, NaN as null: what CSV can hold."""
    columns = []
    for column in table.columns:
        t = column.type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
            values = [
                None if v is None else base64.b64encode(v).decode() for v in column.to_pylist()
            ]
            column = pa.chunked_array([pa.array(values, pa.string())])
        elif pa.types.is_nested(t):
            values = [None if v is None else json.dumps(_jsonable(v)) for v in column.to_pylist()]
            column = pa.chunked_array([pa.array(values, pa.string())])
        elif pa.types.is_floating(t):
            column = pc.if_else(pc.is_nan(column), pa.scalar(None, t), column)
        columns.append(column)
    return pa.Table.from_arrays(columns, names=table.column_names)


def _jsonable(value: Any) -> Any:
    """A Python value from Arrow as plain JSON data."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


def _text(value: Any) -> str:
    """A value as a terminal table shows it."""
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def print_result(
    console: Console, table: pa.Table, *, title: str | None = None, max_rows: int = _MAX_TABLE_ROWS
) -> None:
    """A query result as a terminal table (the first ``max_rows`` rows, and a note of the rest).

    Args:
        console: Where to print.
        table: The result.
        title: Table title.
        max_rows: Rows shown.
    """
    out = Table(title=title, show_lines=False)
    for field in table.schema:
        numeric = pa.types.is_integer(field.type) or pa.types.is_floating(field.type)
        out.add_column(escape(field.name), justify="right" if numeric else "left", overflow="fold")
    for row in table.slice(0, max_rows).to_pylist():
        out.add_row(*(escape(_text(v)) for v in row.values()))
    if table.num_rows > max_rows:
        out.caption = f"{max_rows} of {table.num_rows} rows shown; --format csv writes all"
    else:
        out.caption = f"{table.num_rows} row{'s' if table.num_rows != 1 else ''}"
    _print_table(console, out)


def print_runs(console: Console, runs: pa.Table) -> None:
    """The runs listing: one line per run, oldest first.

    Args:
        console: Where to print.
        runs: :meth:`Results.runs`.
    """
    out = Table(title="committed runs")
    out.add_column("run", overflow="fold")
    out.add_column("kind", overflow="fold")
    out.add_column("finished (UTC)", overflow="fold")
    for name in ("images", "errors", "mean IoU"):
        out.add_column(name, justify="right", overflow="fold")
    for name in ("input", "model"):
        out.add_column(name, overflow="fold")
    for r in runs.to_pylist():
        out.add_row(
            escape(r["run_id"]),
            r["kind"],
            f"{r['finished_at']:%Y-%m-%d %H:%M}",
            str(r["num_images"]),
            str(r["num_errors"]),
            _score(r["mean_iou"]),
            escape(r["input_uri"] or "-"),
            escape(r["model_uri"] or "-"),
        )
    _print_table(console, out)


def _print_table(console: Console, table: Table) -> None:
    """Print a table; into a pipe or file at the width it needs (no folded cells)."""
    if console.is_terminal:
        console.print(table)
        return
    needed = Measurement.get(console, console.options.update_width(10_000), table).maximum
    width = console.width
    console.width = max(width, needed)
    try:
        console.print(table, crop=False)
    finally:
        console.width = width


def _errors_text(count: int) -> str:
    return f"{count} error{'' if count == 1 else 's'}"


def _score(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def print_report(console: Console, results: Results, run_id: str, *, num_images: int = 4) -> None:
    """A run's report in the terminal: facts, the paper's metrics, per-class IoU, training,
    and the best and worst images.

    Args:
        console: Where to print.
        results: The output root.
        run_id: A committed run.
        num_images: Best and worst images named.
    """
    s = results.summary(run_id)

    def fact(name: str, value: str) -> None:
        console.print(f"{name:<9} {escape(value)}", highlight=False, soft_wrap=True)

    fact("run", f"{s.run_id} ({s.kind})")
    fact("input", s.input_uri or "-")
    fact("model", s.model_uri or "-")
    history = results.training(run_id)
    if history.num_rows:
        last = history.slice(history.num_rows - 1).to_pylist()[0]
        fact(
            "training",
            f"{s.training_run_id}: {history.num_rows} epochs, last train loss "
            f"{_score(last['train_loss'])}, val mean IoU {_score(last['val_mean_iou'])}",
        )
    speed = f", {s.images_per_s:.1f} images/s" if s.images_per_s is not None else ""
    fact("images", f"{s.num_images} ({_errors_text(s.num_errors)}){speed}")
    fact("finished", f"{s.finished_at:%Y-%m-%d %H:%M:%S} UTC")
    if s.class_iou:
        where = "val split" if s.kind == "train" else "images with masks"
        print_paper_table(console, {s.run_id: s.scores}, title=where, label="run")
        print_class_iou(console, list(s.class_iou), s.class_names)
    else:
        fact("scores", "none (no image of the input had a mask)")
    best, worst = results.best_and_worst(run_id, num_images)
    for name, ranked in (("best", best), ("worst", worst)):
        if ranked:
            fact(name, ", ".join(f"{i.image_id} ({_score(i.mean_iou)})" for i in ranked))


# ----------------------------------------------------------------------------- HTML


def write_html_report(
    out_uri: str | Location,
    run_id: str,
    path: str,
    *,
    num_images: int = 4,
    alpha: float = DEFAULT_ALPHA,
    options: StorageOptions | None = None,
) -> str:
    """Write one self-contained HTML file about a run (see :func:`render_html`).

    Args:
        out_uri: The output root.
        run_id: A committed run.
        path: Where to write (path or URI).
        num_images: Best and worst images shown.
        alpha: Weight of the class colours in the overlays.
        options: Storage options for string URIs.

    Returns:
        The URI written.
    """
    with Results(out_uri, options) as results:
        return results.write_html(run_id, path, num_images=num_images, alpha=alpha)


def render_html(
    results: Results, run_id: str, *, num_images: int = 4, alpha: float = DEFAULT_ALPHA
) -> str:
    """A run's report as one HTML page with nothing to fetch: no scripts, inline SVG charts,
    PNG overlays as data URIs.

    Sections: the run's facts and the paper's metrics; the per-class IoU bar chart
    (``svg#class-iou-chart``); training curves (``#training-curves``: train loss and val
    mean IoU by epoch) when the model's training rows are under the root; the best and worst
    ``num_images`` images as overlays (``#best-images``, ``#worst-images``, each a
    ``figure.overlay``), or the first images where none has a mask; the run's errors.

    Args:
        results: The output root.
        run_id: A committed run.
        num_images: Best and worst images shown.
        alpha: Weight of the class colours in the overlays.
    """
    s = results.summary(run_id)
    parts = [f"<h1>Run {_h(run_id)}</h1>", _facts_html(s, results.out_uri), _metrics_html(s)]
    parts.append('<section id="class-iou"><h2>IoU per class</h2>')
    if s.class_iou:
        parts.append(_class_iou_svg(s.class_names, s.class_iou, s.scores.get("mean_iou")))
    else:
        parts.append("<p>No scores: no image of the input had a mask.</p>")
    parts.append("</section>")
    parts.append(_training_html(s, results.training(run_id)))
    parts.append(_images_html(results, s, num_images, alpha))
    if s.num_errors:
        parts.append(_errors_html(results.errors(run_id, _MAX_ERROR_ROWS), s.num_errors))
    return _page(f"fcnpipe report: {run_id}", "\n".join(parts))


def _h(value: Any) -> str:
    return html.escape(str(value), quote=True)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1100px; margin: 2rem auto; padding: 0 1rem; background: #fff; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem;
     border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
table { border-collapse: collapse; } th, td { padding: .25rem .7rem; text-align: left;
        border-bottom: 1px solid #eee; } td.num, th.num { text-align: right;
        font-variant-numeric: tabular-nums; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem; }
dl.facts dt { color: #666; } dl.facts dd { margin: 0; word-break: break-all; }
svg.chart { background: #fff; } svg.chart text { font-size: 12px; fill: #333; }
.curves { display: flex; flex-wrap: wrap; gap: 1.5rem; }
.overlays { display: flex; flex-wrap: wrap; gap: 1.2rem; }
figure.overlay { margin: 0; } figure.overlay img { display: block; max-width: 100%;
                 height: auto; image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { font-size: .85rem; color: #444; margin-top: .2rem; }
.legend { font-size: .85rem; } .legend .item { margin-right: 1rem; white-space: nowrap; }
.swatch { display: inline-block; width: .9em; height: .9em; margin-right: .3em;
          vertical-align: middle; border: 1px solid #888; }
p.note { color: #666; }
"""


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_h(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n"
        '<p class="note">Written by fcnpipe report.</p>\n</body>\n</html>\n'
    )


def _facts_html(s: RunSummary, out_uri: str) -> str:
    speed = f"{s.images_per_s:.1f}" if s.images_per_s is not None else "-"
    seconds = (s.finished_at - s.started_at).total_seconds()
    facts = [
        ("output root", out_uri),
        ("kind", s.kind),
        ("input", s.input_uri or "-"),
        ("model", s.model_uri or "-"),
        ("training run", s.training_run_id or "not under this output root"),
        ("images", f"{s.num_images} ({_errors_text(s.num_errors)})"),
        ("finished", f"{s.finished_at:%Y-%m-%d %H:%M:%S} UTC ({seconds:.0f} s)"),
        ("images/s", speed),
    ]
    rows = "".join(f"<dt>{_h(k)}</dt><dd>{_h(v)}</dd>" for k, v in facts)
    return f'<dl class="facts" id="facts">{rows}</dl>'


def _metrics_html(s: RunSummary) -> str:
    head = "".join(f'<th class="num">{_h(t)}</th>' for t in PAPER_METRICS.values())
    cells = "".join(f'<td class="num">{_score(s.scores.get(k))}</td>' for k in PAPER_METRICS)
    where = "val split" if s.kind == "train" else "images with masks"
    return (
        f'<section id="metrics"><h2>Metrics ({_h(where)})</h2>'
        f'<table id="paper-metrics"><tr><th>run</th>{head}</tr>'
        f"<tr><td>{_h(s.run_id)}</td>{cells}</tr></table></section>"
    )


def _class_iou_svg(
    names: Sequence[str], iou: Sequence[float | None], mean_iou: float | None
) -> str:
    """Horizontal bars, one per class, on a 0..1 axis, with the mean IoU as a dashed line."""
    label_w, bar_w, row_h, top = 150, 400, 22, 10
    width, height = label_w + bar_w + 70, top + row_h * len(names) + 30
    bottom = top + row_h * len(names)
    out = [
        f'<svg id="class-iou-chart" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="IoU per class">',
        "<title>IoU per class</title>",
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = label_w + tick * bar_w
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#ddd"/>')
        out.append(f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{tick:g}</text>')
    for i, (name, value) in enumerate(zip(names, iou, strict=True)):
        y = top + i * row_h
        out.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{_h(name)}</text>')
        if value is None or math.isnan(value):
            out.append(f'<text x="{label_w + 4}" y="{y + 15}" fill="#999">absent</text>')
            continue
        w = max(0.0, min(1.0, value)) * bar_w
        out.append(
            f'<rect x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row_h - 8}" '
            f'fill="#4e79a7"><title>{_h(name)}: {value:.3f}</title></rect>'
        )
        out.append(f'<text x="{label_w + w + 5:.1f}" y="{y + 15}">{value:.3f}</text>')
    if mean_iou is not None and not math.isnan(mean_iou):
        x = label_w + max(0.0, min(1.0, mean_iou)) * bar_w
        out.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#e15759" '
            'stroke-width="1.5" stroke-dasharray="4 3"/>'
        )
        out.append(
            f'<text x="{x:.1f}" y="{bottom + 28}" text-anchor="middle" fill="#e15759">'
            f"mean {mean_iou:.3f}</text>"
        )
    out.append("</svg>")
    return "".join(out)


def _line_svg(
    title: str,
    epochs: Sequence[int],
    values: Sequence[float | None],
    color: str,
    y_max: float | None = None,
) -> str:
    """One small line chart of a value by epoch (nulls left out)."""
    width, height, left, right, top, bottom = 340, 230, 50, 15, 28, 36
    points = [
        (e, v) for e, v in zip(epochs, values, strict=True) if v is not None and math.isfinite(v)
    ]
    top_value = y_max if y_max is not None else max([v for _, v in points] + [1e-9]) * 1.1
    lo, hi = min(epochs, default=0), max(epochs, default=1)
    span = hi - lo

    def x_of(epoch: int) -> float:
        inner = width - left - right
        return left + (inner / 2 if span == 0 else (epoch - lo) / span * inner)

    def y_of(value: float) -> float:
        return top + (1 - value / top_value) * (height - top - bottom)

    out = [
        f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{_h(title)}"><title>{_h(title)}</title>',
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-weight="bold">{_h(title)}</text>',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" '
        'stroke="#888"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#888"/>',
    ]
    for tick in (0.0, top_value / 2, top_value):
        y = y_of(tick)
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#eee"/>'
        )
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:.3g}</text>')
    step = max(1, math.ceil((span + 1) / 8))
    for epoch in range(lo, hi + 1, step):
        out.append(
            f'<text x="{x_of(epoch):.1f}" y="{height - bottom + 16}" text-anchor="middle">'
            f"{epoch}</text>"
        )
    out.append(
        f'<text x="{(left + width - right) / 2}" y="{height - 4}" text-anchor="middle">epoch</text>'
    )
    if points:
        coords = " ".join(f"{x_of(e):.1f},{y_of(v):.1f}" for e, v in points)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>')
        for e, v in points:
            out.append(
                f'<circle cx="{x_of(e):.1f}" cy="{y_of(v):.1f}" r="3" fill="{color}">'
                f"<title>epoch {e}: {v:.4g}</title></circle>"
            )
    else:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no values</text>')
    out.append("</svg>")
    return "".join(out)


def _training_html(s: RunSummary, history: pa.Table) -> str:
    if not history.num_rows:
        why = (
            f"the model {s.model_uri} was not trained under this output root"
            if s.training_run_id is None
            else f"run {s.training_run_id} has no training rows"
        )
        return (
            '<section id="training"><h2>Training</h2>'
            f'<p class="note">No curves: {_h(why)}.</p></section>'
        )
    epochs = [int(e) for e in history["epoch"].to_pylist()]
    loss = _line_svg("train loss", epochs, history["train_loss"].to_pylist(), "#4e79a7")
    iou = _line_svg("val mean IoU", epochs, history["val_mean_iou"].to_pylist(), "#59a14f", 1.0)
    return (
        '<section id="training"><h2>Training</h2>'
        f"<p>Run {_h(s.training_run_id)}, {len(epochs)} epochs.</p>"
        f'<div id="training-curves" class="curves">{loss}{iou}</div></section>'
    )


def _legend_html(class_names: Sequence[str]) -> str:
    from fcn.palette import voc_palette

    colours = voc_palette(max(1, len(class_names)))
    items = "".join(
        f'<span class="item"><span class="swatch" style="background: rgb({r},{g},{b})"></span>'
        f"{_h(name)}</span>"
        for name, (r, g, b) in zip(class_names, colours.tolist(), strict=True)
    )
    return f'<p class="legend">{items}</p>'


def _figure_html(panel: Panel, score: ImageScore | None) -> str:
    height, width = panel.pixels.shape[:2]
    scale = max(1, math.ceil(160 / height))
    data = base64.b64encode(panel.to_png()).decode()
    caption = f"<b>{_h(panel.image_id)}</b>"
    if score is not None:
        caption += f" · mean IoU {_score(score.mean_iou)} · pixel acc {_score(score.pixel_acc)}"
    return (
        f'<figure class="overlay" data-image-id="{_h(panel.image_id)}">'
        f'<img src="data:image/png;base64,{data}" width="{width * scale}" '
        f'height="{height * scale}" alt="{_h(panel.parts)}: {_h(panel.image_id)}">'
        f"<figcaption>{caption}<br>{_h(panel.parts)}</figcaption></figure>"
    )


def _images_html(results: Results, s: RunSummary, n: int, alpha: float) -> str:
    if not results.sample_ids(s.run_id, 1):
        return ""
    legend = _legend_html(s.class_names)
    best, worst = results.best_and_worst(s.run_id, n)
    if not best:
        ids = results.sample_ids(s.run_id, n)
        figures = "".join(_figure_html(p, None) for p in results.panels(s.run_id, ids, alpha=alpha))
        return (
            f'<section id="sample-images"><h2>Images</h2><p class="note">No per-image scores '
            f"(no image had a mask): the first {len(ids)} by id.</p>{legend}"
            f'<div class="overlays">{figures}</div></section>'
        )
    sections = []
    for key, title, ranked in (("best", "Best", best), ("worst", "Worst", worst)):
        if not ranked:
            continue
        panels = results.panels(s.run_id, [i.image_id for i in ranked], alpha=alpha)
        figures = "".join(_figure_html(p, i) for p, i in zip(panels, ranked, strict=True))
        sections.append(
            f'<section id="{key}-images"><h2>{title} {len(ranked)} images by mean IoU</h2>'
            f'{legend}<div class="overlays">{figures}</div></section>'
        )
    return "".join(sections)


def _errors_html(errors: pa.Table, total: int) -> str:
    rows = "".join(
        "<tr>" + "".join(f"<td>{_h(r[k] if r[k] is not None else '-')}</td>" for k in r) + "</tr>"
        for r in errors.to_pylist()
    )
    head = "".join(f"<th>{_h(n)}</th>" for n in errors.column_names)
    more = (
        f'<p class="note">{errors.num_rows} of {total} shown; the errors table has all.</p>'
        if total > errors.num_rows
        else ""
    )
    return (
        f'<section id="errors"><h2>Errors ({total})</h2><table><tr>{head}</tr>{rows}</table>'
        f"{more}</section>"
    )
