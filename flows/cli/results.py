"""``fcnpipe query | runs | report | show``: the committed runs under an output root."""

from __future__ import annotations

import sys
from typing import Annotated, Literal

import typer
from rich.console import Console

from flows.cli.common import CatalogOption, S3Endpoint, app, storage_options

__all__: list[str] = []

OutUri = Annotated[
    str, typer.Argument(help="Output root of the runs: the --output of train and segment.")
]


@app.command()
def query(
    out_uri: OutUri,
    sql: Annotated[
        str,
        typer.Argument(help="DuckDB SQL over predictions, class_metrics, runs, errors, training."),
    ],
    fmt: Annotated[
        Literal["table", "csv", "json", "parquet"] | None,
        typer.Option(
            "--format", help="Output format (default: from --out's suffix, else a table)."
        ),
    ] = None,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Write to this file (path or URI).")
    ] = None,
    s3_endpoint: S3Endpoint = None,
    catalog: CatalogOption = None,
) -> None:
    """Run SQL over the result tables of the committed runs (local or S3).

    \b
    Example:
        fcnpipe query OUT "SELECT class_name, avg(iou) FROM class_metrics GROUP BY 1"
    """
    from pipeline.results.output import choose_format, encode_result, print_result
    from pipeline.results.reader import Results
    from pipeline.storage import resolve, write_bytes

    chosen = choose_format(fmt, out)
    options = storage_options(s3_endpoint, catalog)
    with Results(out_uri, options) as results:
        table = results.query(sql)
    if chosen == "table":
        print_result(Console(), table)
        return
    data = encode_result(table, chosen)
    if out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    target = resolve(out, options)
    write_bytes(target, data)
    typer.echo(f"wrote {table.num_rows} rows ({chosen}) to {target.uri}")


@app.command()
def runs(out_uri: OutUri, s3_endpoint: S3Endpoint = None, catalog: CatalogOption = None) -> None:
    """List the committed runs under an output root, oldest first."""
    from pipeline.results.output import print_runs
    from pipeline.results.reader import Results

    with Results(out_uri, storage_options(s3_endpoint, catalog)) as results:
        print_runs(Console(), results.runs())


@app.command()
def report(
    out_uri: OutUri,
    run_id: Annotated[str, typer.Argument(help="A committed run (see `fcnpipe runs`).")],
    html: Annotated[
        str | None, typer.Option(help="Also write a self-contained HTML report here.")
    ] = None,
    images: Annotated[int, typer.Option(min=1, help="Best and worst images shown.")] = 4,
    s3_endpoint: S3Endpoint = None,
    catalog: CatalogOption = None,
) -> None:
    """Print a run's paper metrics, per-class IoU and best and worst images; --html writes
    a report with charts, training curves and overlays."""
    from pipeline.results.html import write_html_report
    from pipeline.results.output import print_report
    from pipeline.results.reader import Results

    with Results(out_uri, storage_options(s3_endpoint, catalog)) as results:
        print_report(Console(), results, run_id, num_images=images)
        if html is not None:
            typer.echo(f"report:   {write_html_report(results, run_id, html, num_images=images)}")


@app.command()
def show(
    out_uri: OutUri,
    run_id: Annotated[str, typer.Argument(help="A committed segment run.")],
    image_id: Annotated[str, typer.Argument(help="An image the run segmented.")],
    out: Annotated[str, typer.Option("--out", "-o", help="PNG to write (path or URI).")],
    s3_endpoint: S3Endpoint = None,
    catalog: CatalogOption = None,
) -> None:
    """Write one image's overlay: image | ground truth | prediction (image | prediction
    without a mask)."""
    from pipeline.results.html import overlay_panel
    from pipeline.results.reader import Results
    from pipeline.storage import resolve, write_bytes

    options = storage_options(s3_endpoint, catalog)
    with Results(out_uri, options) as results:
        panel = overlay_panel(results, run_id, image_id)
    target = resolve(out, options)
    write_bytes(target, panel.to_png())
    score = f", mean IoU {panel.mean_iou:.3f}" if panel.mean_iou is not None else ""
    typer.echo(f"wrote {target.uri}: {panel.parts}{score}")
