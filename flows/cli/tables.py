"""``fcnpipe tables info | maintain | migrate``: the result tables' Iceberg catalog."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from flows.cli.common import CatalogOption, S3Endpoint, storage_options, tables_app

__all__: list[str] = []

OutUri = Annotated[
    str, typer.Argument(help="Output root of the runs: the --output of train and segment.")
]


@tables_app.command("info")
def tables_info(
    out_uri: OutUri,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    s3_endpoint: S3Endpoint = None,
    catalog: CatalogOption = None,
) -> None:
    """How any Iceberg client connects to the tables: the catalog's properties (no secrets)
    and the table identifiers.

    \b
    Example (Python, any machine that reaches the catalog and the storage):
        props = json.loads(subprocess.check_output(["fcnpipe", "tables", "info", OUT, "--json"]))
        catalog = pyiceberg.catalog.load_catalog(props["name"], **props["properties"])
        polars.scan_iceberg(catalog.load_table(props["tables"]["predictions"]))
    """
    from pipeline.storage import resolve
    from pipeline.store.catalog import TableStore, catalog_info

    root = resolve(out_uri, storage_options(s3_endpoint, catalog))
    info = catalog_info(root)
    store = TableStore.open(root)
    runs = store.committed_runs() if store is not None else []
    doc = {
        "name": info.name,
        "properties": info.properties,
        "namespace": info.namespace,
        "tables": info.identifiers,
        "embedded": info.embedded,
        "committed_runs": len(runs),
    }
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    where = (
        f"embedded: pyiceberg SQL catalog on SQLite, {info.embedded}"
        if info.embedded is not None
        else f"named: {info.properties.get('type', 'from the pyiceberg configuration')}"
    )
    typer.echo(f"catalog:     {info.name} ({where})")
    typer.echo(f"connect:     pyiceberg.catalog.load_catalog({info.name!r}, **properties)")
    typer.echo("properties:")
    for key, value in info.properties.items():
        typer.echo(f"  {key} = {value}")
    typer.echo(f"tables:      {', '.join(info.identifiers.values())}")
    typer.echo(f"runs:        {len(runs)} committed")
    typer.echo(
        "credentials: from the environment, never here: AWS_ACCESS_KEY_ID / "
        f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for S3, PYICEBERG_CATALOG__{info.name.upper()}__* "
        "for the catalog"
    )


@tables_app.command("maintain")
def tables_maintain(
    out_uri: OutUri,
    older_than: Annotated[
        str,
        typer.Option(
            help="Expire snapshots and delete orphan files older than this (s, m, h, d); "
            "longer than any run, whose uncommitted files it would delete."
        ),
    ] = "7d",
    s3_endpoint: S3Endpoint = None,
    catalog: CatalogOption = None,
) -> None:
    """Expire old snapshots and delete files no snapshot needs (crashed attempts, replaced
    runs, old metadata); committed rows stay readable."""
    from pipeline.store.maintain import maintain, parse_age

    maintain(
        out_uri,
        older_than=parse_age(older_than),
        options=storage_options(s3_endpoint, catalog),
        echo=typer.echo,
    )


@tables_app.command("migrate")
def tables_migrate(
    out_uri: OutUri, s3_endpoint: S3Endpoint = None, catalog: CatalogOption = None
) -> None:
    """Convert an output root of the marker format (OUT/_committed) to Iceberg tables, in
    place (committed runs only; safe to run again if interrupted)."""
    from pipeline.store.migrate import migrate

    migrate(out_uri, options=storage_options(s3_endpoint, catalog), echo=typer.echo)
