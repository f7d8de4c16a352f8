"""``fcnpipe models`` and ``fcnpipe dataset synth | index | info``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from flows.cli.common import LayoutOption, S3Endpoint, app, dataset_app, storage_options

__all__: list[str] = []


@app.command()
def models() -> None:
    """List the FCN heads and backbones that `--model` and `--backbone` accept."""
    from fcn.names import BACKBONES, HEADS

    typer.echo("heads:     " + ", ".join(HEADS))
    typer.echo("backbones: " + ", ".join(BACKBONES))


@dataset_app.command("synth")
def dataset_synth(
    out_uri: Annotated[str, typer.Argument(help="Dataset root to write (path, file://, s3://).")],
    num_images: Annotated[int, typer.Option(min=1, help="Number of images.")] = 100,
    size: Annotated[int, typer.Option(min=16, help="Image side in pixels.")] = 128,
    seed: Annotated[int, typer.Option(min=0, help="Dataset seed.")] = 0,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.99, help="Share in val.")] = 0.2,
    scene_size: Annotated[
        int | None,
        typer.Option(
            min=256,
            help="Write large scenes instead: NUM_IMAGES tiled TIFFs (and masks) this many "
            "pixels a side, in the generic layout (to try --tile; 20000 takes about a minute).",
        ),
    ] = None,
    s3_endpoint: S3Endpoint = None,
) -> None:
    """Write the synthetic shapes dataset in VOC layout (with classes.txt) to any URI."""
    from pipeline.data.synthetic import write_scenes, write_synthetic

    if scene_size is not None:
        info = write_scenes(
            out_uri,
            num_scenes=num_images,
            size=scene_size,
            seed=seed,
            options=storage_options(s3_endpoint),
        )
        typer.echo(
            f"wrote {info.num_images} scene(s) of {scene_size}x{scene_size} pixels to {info.uri}"
        )
        return
    info = write_synthetic(
        out_uri,
        num_images=num_images,
        size=size,
        seed=seed,
        val_fraction=val_fraction,
        options=storage_options(s3_endpoint),
    )
    splits = ", ".join(f"{k} {v}" for k, v in sorted(info.splits.items()))
    typer.echo(f"wrote {info.num_images} images ({splits}) to {info.uri}")


@dataset_app.command("index")
def dataset_index(
    dataset_uri: Annotated[str, typer.Argument(help="Dataset root to list.")],
    output: Annotated[
        str | None, typer.Option(help="Manifest URI (default: DATASET_URI/manifest.parquet).")
    ] = None,
    layout: LayoutOption = "auto",
    split: Annotated[str | None, typer.Option(help="Only this split's ids.")] = None,
    s3_endpoint: S3Endpoint = None,
) -> None:
    """Write a Parquet manifest (image_uri, mask_uri, split, bytes, image_version) so jobs
    need not list again."""
    from pipeline.data.layouts import build_manifest, write_manifest
    from pipeline.storage import join

    options = storage_options(s3_endpoint)
    table = build_manifest(dataset_uri, layout=layout, split=split, options=options)
    target = output or join(dataset_uri, "manifest.parquet")
    write_manifest(table, target, options)
    typer.echo(f"wrote a manifest of {table.num_rows} rows to {target}")


@dataset_app.command("info")
def dataset_info(
    dataset_uri: Annotated[str, typer.Argument(help="Dataset root or .parquet manifest.")],
    layout: LayoutOption = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    s3_endpoint: S3Endpoint = None,
) -> None:
    """Print a dataset's layout, image counts per split and class names."""
    from pipeline.data.layouts import dataset_info as info_of

    info = info_of(dataset_uri, layout=layout, options=storage_options(s3_endpoint))
    if as_json:
        typer.echo(json.dumps(info.to_dict(), indent=2))
        return
    typer.echo(f"dataset:  {info.uri}")
    typer.echo(f"layout:   {info.layout or 'unknown (manifest without metadata)'}")
    typer.echo(f"images:   {info.num_images} ({info.num_with_masks} with masks)")
    if info.num_missing:
        typer.echo(f"missing:  {info.num_missing} ids named by split files have no image")
    for name, count in sorted(info.splits.items()):
        typer.echo(f"split:    {name} {count}")
    classes = ", ".join(info.class_names) if info.class_names else "not named"
    typer.echo(f"classes:  {classes}")
