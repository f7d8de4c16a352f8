"""Results for people and files: query results as terminal tables, CSV, JSON or Parquet; the
runs list and a run's report on the terminal.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Mapping, Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, get_args

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from fcn.metrics import PAPER_METRICS

if TYPE_CHECKING:
    from rich.console import Console


from rich.console import Console

from pipeline.errors import ConfigError
from pipeline.results.reader import Results

__all__ = [
    "OUTPUT_FORMATS",
    "OutputFormat",
    "choose_format",
    "encode_result",
    "errors_text",
    "format_score",
    "print_class_iou",
    "print_paper_table",
    "print_report",
    "print_result",
    "print_runs",
]

OutputFormat = Literal["table", "csv", "json", "parquet"]
"""How query results are written: a terminal table, or a file format."""


OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)


_SUFFIX_FORMATS: dict[str, OutputFormat] = {".csv": "csv", ".json": "json", ".parquet": "parquet"}


_MAX_TABLE_ROWS = 200


def choose_format(fmt: str | None, out: str | None) -> OutputFormat:
    """The output format: as given, else from ``out``'s suffix, else a table.

    Args:
        fmt: ``table``, ``csv``, ``json``, ``parquet`` or None.
        out: The output file, or None for standard output.

    Raises:
        ConfigError: An unknown format, a table asked into a file, or Parquet without a file.
    """
    if fmt is None:
        suffix = "." + out.rsplit(".", 1)[-1].lower() if out is not None and "." in out else ""
        if out is not None and suffix not in _SUFFIX_FORMATS:
            raise ConfigError(
                f"cannot tell the format of {out}: give --format csv, json or parquet"
            )
        return _SUFFIX_FORMATS[suffix] if out is not None else "table"
    if fmt not in OUTPUT_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    if fmt == "table" and out is not None:
        raise ConfigError(
            "--format table prints to the terminal; give csv, json or parquet with --out"
        )
    if fmt == "parquet" and out is None:
        raise ConfigError("--format parquet needs --out PATH (Parquet is not for a terminal)")
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
        rows = [{k: _json_value(v) for k, v in row.items()} for row in table.to_pylist()]
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
            values = [None if v is None else json.dumps(_json_value(v)) for v in column.to_pylist()]
            column = pa.chunked_array([pa.array(values, pa.string())])
        elif pa.types.is_floating(t):
            column = pc.if_else(pc.is_nan(column), pa.scalar(None, t), column)
        columns.append(column)
    return pa.Table.from_arrays(columns, names=table.column_names)


def _json_value(value: Any) -> Any:
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
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
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
            format_score(r["mean_iou"]),
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


def errors_text(count: int) -> str:
    """``N errors`` (``1 error``)."""
    return f"{count} error{'' if count == 1 else 's'}"


def format_score(value: float | None) -> str:
    """A metric as tables show it: three decimals, ``-`` where undefined (None or NaN)."""
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
            f"{format_score(last['train_loss'])}, "
            f"val mean IoU {format_score(last['val_mean_iou'])}",
        )
    speed = f", {s.images_per_s:.1f} images/s" if s.images_per_s is not None else ""
    fact("images", f"{s.num_images} ({errors_text(s.num_errors)}){speed}")
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
            fact(name, ", ".join(f"{i.image_id} ({format_score(i.mean_iou)})" for i in ranked))


def print_paper_table(
    console: Console, rows: Mapping[str, Mapping[str, Any]], *, title: str, label: str = "model"
) -> None:
    """One row per model (or variant) with the paper's four metrics.

    Args:
        console: Where to print.
        rows: Row label -> scores (``fcn.metrics.scores`` keys).
        title: Table title.
        label: Title of the first column.
    """
    table = Table(title=title)
    table.add_column(label)
    for column in PAPER_METRICS.values():
        table.add_column(column, justify="right")
    for name, scores in rows.items():
        table.add_row(name, *(format_score(scores.get(key)) for key in PAPER_METRICS))
    console.print(table)


def print_class_iou(
    console: Console, iou: Sequence[float | None], class_names: Sequence[str]
) -> None:
    """Per-class IoU; "absent" where a class is in neither the ground truth nor the prediction.

    Args:
        console: Where to print.
        iou: IoU per class id (NaN or None where undefined).
        class_names: Name per class id.
    """
    table = Table(title="per-class IoU")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for name, value in zip(class_names, iou, strict=True):
        score = format_score(value)
        table.add_row(name, "absent" if score == "-" else score)
    console.print(table)
