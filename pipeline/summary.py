"""Printing metrics the way the paper's tables show them (pixel acc, mean acc, mean IoU, f.w. IoU).

Shared by the commands that end with scores: ``train``, ``experiment skips`` and the demo.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["PAPER_METRICS", "print_class_iou", "print_paper_table"]

PAPER_METRICS: dict[str, str] = {
    "pixel_acc": "pixel acc",
    "mean_acc": "mean acc",
    "mean_iou": "mean IoU",
    "fw_iou": "f.w. IoU",
}
"""The paper's four metrics (Table 3 onwards) and their column titles."""


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.3f}"


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
        table.add_row(name, *(_cell(scores.get(key)) for key in PAPER_METRICS))
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
        undefined = value is None or math.isnan(value)
        table.add_row(name, "absent" if undefined else f"{value:.3f}")
    console.print(table)
