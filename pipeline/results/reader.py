"""Reading results: SQL over the committed runs, run summaries, per-image scores.

Usage:
    fcnpipe runs OUT
    fcnpipe query OUT "SELECT run_id, kind, mean_iou FROM runs" --format csv
    fcnpipe report OUT RUN_ID --html report.html
    fcnpipe show OUT RUN_ID IMAGE_ID --out overlay.png

Everything here reads *committed* runs only, through the Iceberg catalog
(:mod:`pipeline.store.read`): DuckDB views ``predictions``, ``class_metrics``, ``runs``,
``errors`` and ``training`` over the data files of the tables' current snapshots (scanned as
Arrow, no DuckDB extension), on local disk or S3 alike.

- A run's scores come from its ``runs`` row; a per-image mean IoU is the mean of the image's
  ``class_metrics.iou`` (classes in its ground truth or prediction, as the paper's mean IoU
  over a split), and its pixel accuracy is ``sum(intersection) / sum(gt_pixels)``.
- The training curves of a segment run are the ``training`` rows of the train run whose
  ``runs.model_uri`` is the segment run's model (URIs compared after :func:`resolve`).
- Overlay panels and the HTML report (:mod:`pipeline.results.html`) read the predictions and
  the input's masks through :meth:`Results.predictions` and :meth:`Results.mask_uris`.

Example::

    with Results("s3://bucket/out") as results:
        results.query("SELECT image_id, iou FROM class_metrics WHERE class_name = ?", ["disc"])
        best, worst = results.best_and_worst(run_id, 4)
        pipeline.results.html.write_html_report(results, run_id, "report.html")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from fcn.metrics import PAPER_METRICS
from pipeline.errors import ConfigError, InputError
from pipeline.storage import Location, StorageOptions, resolve
from pipeline.store.read import TableReader
from pipeline.tables import TABLES, RunNotCommittedError, TableError

if TYPE_CHECKING:
    import duckdb

__all__ = [
    "ImageNotFoundError",
    "ImageScore",
    "NoRunsError",
    "QueryError",
    "Results",
    "RunSummary",
    "query",
]


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


class NoRunsError(TableError, InputError, LookupError):
    """An output root without a single committed run."""


class QueryError(TableError, InputError, ValueError):
    """SQL that DuckDB cannot parse, bind or run; the message says what is wrong."""


class ImageNotFoundError(TableError, InputError, LookupError):
    """An image id that has no prediction in the run (the message says why, where known)."""


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """One run's ``runs`` row, and where its training curves are."""

    run_id: str
    """Its id."""
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
    """The paper's four metrics (:data:`fcn.metrics.PAPER_METRICS` keys); None: no masks."""
    class_names: tuple[str, ...]
    """Name per class id."""
    class_iou: tuple[float | None, ...]
    """IoU per class id (None where absent from ground truth and prediction); empty: no masks."""
    started_at: datetime
    """Start (UTC)."""
    finished_at: datetime
    """End (UTC)."""
    images_per_s: float | None
    """Training (mean of the epochs) or segmentation throughput."""
    training_run_id: str | None
    """The train run of the model (this run for a train run); None where not under this root."""


@dataclass(frozen=True)
class ImageScore:
    """One image's scores in a run."""

    image_id: str
    """Its id in the run's predictions."""
    mean_iou: float | None
    """Mean IoU over the classes in its ground truth or prediction."""
    pixel_acc: float | None
    """Share of its labelled pixels predicted right."""


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
        self._tables = TableReader(self._root)
        self.run_ids: list[str] = self._tables.run_ids
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

    @property
    def options(self) -> StorageOptions:
        """Storage options of the output root (and of the inputs it names)."""
        return self._root.options

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
            self._con = self._tables.duckdb(self.run_ids)
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
            return resolve(uri, self.options).uri
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
            raise ConfigError(f"number of images must be >= 1, got {n}")
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

    def predictions(
        self, run_id: str, image_ids: Sequence[str], columns: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        """``columns`` of the run's ``predictions`` rows of ``image_ids``, by image id.

        Args:
            run_id: A committed segment run.
            image_ids: Images it segmented.
            columns: Columns to read (``image_id`` is always read).

        Raises:
            ImageNotFoundError: An image without a prediction in the run (the message says
                whether it failed, and how to list the run's images).
        """
        summary = self.summary(run_id)
        rows = (
            self._tables.dataset("predictions", [run_id])
            .to_table(
                columns=list(dict.fromkeys(["image_id", *columns])),
                filter=pc.field("image_id").isin(list(image_ids)),
            )
            .to_pylist()
        )
        found = {r["image_id"]: r for r in rows}
        missing = [i for i in image_ids if i not in found]
        if missing:
            raise ImageNotFoundError(self._missing_image(summary, missing[0]))
        return found

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

    def mask_uris(self, input_uri: str | None) -> dict[str, str | None]:
        """image_id -> mask URI of the run's input (empty without an input)."""
        if input_uri is None:
            return {}
        if input_uri not in self._masks:
            from pipeline.data.layouts import load_manifest

            manifest = load_manifest(input_uri, options=self.options)
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
        message += f" (views: predictions_latest, {', '.join(TABLES)})"
    return f"query failed: {message}"
