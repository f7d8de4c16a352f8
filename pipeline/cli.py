"""The ``fcnpipe`` command line: Prefect-free pipeline commands.

Usage:
    fcnpipe --help

Every command builds the same typed configuration the Python API and the Prefect
flows take, then calls the pipeline function. ``flows.cli`` adds the commands
that need Prefect and is the installed entry point.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.faults import Faults
from pipeline.storage import StorageError, StorageOptions, join

app = typer.Typer(
    name="fcnpipe",
    help="Distributed batch semantic segmentation with Fully Convolutional Networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dataset_app = typer.Typer(help="Make, index and inspect datasets.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print figures.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")
experiment_app = typer.Typer(help="Experiments of the paper, reproduced.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(experiment_app, name="experiment")
err_console = Console(stderr=True)

S3Endpoint = Annotated[
    str | None,
    typer.Option(
        "--s3-endpoint",
        help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL). "
        "Credentials come from the standard AWS variables or profile, never from options.",
    ),
]
LayoutOption = Annotated[
    Literal["auto", "voc", "generic", "images"],
    typer.Option(help="Dataset layout; auto detects it."),
]

# Errors that mean "the input or the configuration is wrong": the user gets one
# line naming the object and the reason, not a traceback. Anything else is a bug
# and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    PermissionError,
    StorageError,
)
# Also user errors, looked up only if their (heavy) modules were imported: nothing else
# can have raised them, and `fcnpipe --help` stays fast.
_LAZY_USER_ERRORS = (("pipeline.artifacts", "ArtifactError"), ("pipeline.tables", "TableError"))


def _storage(s3_endpoint: str | None) -> StorageOptions:
    return StorageOptions(s3_endpoint=s3_endpoint)


@app.command()
def models() -> None:
    """List the FCN heads and backbones that `--model` and `--backbone` accept."""
    from fcn.models import BACKBONES, HEADS

    typer.echo("heads:     " + ", ".join(HEADS))
    typer.echo("backbones: " + ", ".join(BACKBONES))


@dataset_app.command("synth")
def dataset_synth(
    out_uri: Annotated[str, typer.Argument(help="Dataset root to write (path, file://, s3://).")],
    num_images: Annotated[int, typer.Option(min=1, help="Number of images.")] = 100,
    size: Annotated[int, typer.Option(min=16, help="Image side in pixels.")] = 128,
    seed: Annotated[int, typer.Option(min=0, help="Dataset seed.")] = 0,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.99, help="Share in val.")] = 0.2,
    s3_endpoint: S3Endpoint = None,
) -> None:
    """Write the synthetic shapes dataset in VOC layout (with classes.txt) to any URI."""
    from pipeline.datasets import write_synthetic

    info = write_synthetic(
        out_uri,
        num_images=num_images,
        size=size,
        seed=seed,
        val_fraction=val_fraction,
        options=_storage(s3_endpoint),
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
    """Write a Parquet manifest (image_uri, mask_uri, split, bytes) so jobs need not list again."""
    from pipeline.datasets import build_manifest, write_manifest
    from pipeline.storage import join

    options = _storage(s3_endpoint)
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
    from pipeline.datasets import dataset_info as info_of

    info = info_of(dataset_uri, layout=layout, options=_storage(s3_endpoint))
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


@bench_app.command("read")
def bench_read(
    local_uri: Annotated[
        str | None, typer.Option(help="Local dataset root (default: a synthetic one).")
    ] = None,
    s3_uri: Annotated[
        str | None,
        typer.Option(help="The same dataset on S3 (default: copy to a local SeaweedFS server)."),
    ] = None,
    num_images: Annotated[int, typer.Option(min=1, help="Images read from each.")] = 200,
    size: Annotated[int, typer.Option(min=8, help="Side of the synthetic images.")] = 256,
    s3_endpoint: S3Endpoint = None,
) -> None:
    """Read and decode the same images from local disk and from S3; print images/s and MB/s.

    With no URIs it writes a synthetic dataset to a temporary directory and to a
    SeaweedFS server it starts on 127.0.0.1 (random credentials), and stops it after.
    """
    import ray

    from pipeline.datasets import DatasetConfig, format_bench, write_synthetic
    from pipeline.datasets import bench_read as run_bench

    if (local_uri is None) != (s3_uri is None):
        raise ValueError("give both --local-uri and --s3-uri (the same dataset twice), or neither")
    config = DatasetConfig(storage=_storage(s3_endpoint))
    with tempfile.TemporaryDirectory(prefix="fcnpipe-bench-") as tmp:
        if local_uri is None:
            local_uri = str(Path(tmp) / "local")
            write_synthetic(local_uri, num_images=num_images, size=size)
        if s3_uri is not None:
            result = run_bench(local_uri, s3_uri, num_images=num_images, config=config)
        else:  # the same synthetic bytes on a local S3 server
            from infra.local.seaweedfs import scratch_s3

            with scratch_s3(Path(tmp) / "s3", "bench"):  # before Ray starts
                s3_uri = "s3://bench/data"
                write_synthetic(s3_uri, num_images=num_images, size=size)
                try:
                    result = run_bench(local_uri, s3_uri, num_images=num_images, config=config)
                finally:
                    ray.shutdown()
    typer.echo(format_bench(result))


@app.command()
def train(
    dataset_uri: Annotated[str, typer.Argument(help="Dataset root or manifest, with masks.")],
    output: Annotated[
        str, typer.Option("--output", "-o", help="Output root (path, file://, s3://).")
    ],
    model: Annotated[str, typer.Option(help="FCN head: fcn32s, fcn16s or fcn8s.")] = "fcn8s",
    backbone: Annotated[str, typer.Option(help="Backbone (see `fcnpipe models`).")] = "resnet18",
    num_classes: Annotated[
        int | None, typer.Option(help="Classes (default: the dataset's classes.txt).")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the train split.")] = 8,
    batch_size: Annotated[int, typer.Option(min=1, help="Crops per worker per step.")] = 8,
    crop_size: Annotated[int, typer.Option(min=8, help="Side of the training crops.")] = 256,
    scale_range: Annotated[
        tuple[float, float], typer.Option(help="Random rescale range (LOW HIGH); 1 1 disables.")
    ] = (0.5, 2.0),
    hflip: Annotated[bool, typer.Option(help="Random horizontal flips.")] = True,
    pad_crops: Annotated[
        bool, typer.Option(help="Pad images smaller than a crop (mask: ignore); else reject.")
    ] = True,
    optimizer: Annotated[
        Literal["sgd", "adamw"], typer.Option(help="sgd (momentum) or adamw.")
    ] = "sgd",
    lr: Annotated[float, typer.Option(min=0.0, help="Base learning rate.")] = 0.01,
    momentum: Annotated[float, typer.Option(help="SGD momentum (AdamW beta1).")] = 0.9,
    weight_decay: Annotated[
        float, typer.Option(help="Decay of weights (not biases, norms).")
    ] = 5e-4,
    schedule: Annotated[
        Literal["poly", "cosine", "constant"], typer.Option(help="Learning-rate decay.")
    ] = "poly",
    warmup_steps: Annotated[int, typer.Option(min=0, help="Steps of linear warmup.")] = 0,
    grad_accum: Annotated[int, typer.Option(min=1, help="Batches per optimizer step.")] = 1,
    amp: Annotated[bool, typer.Option(help="bf16 autocast (GPU only).")] = False,
    class_weighting: Annotated[
        Literal["none", "median_frequency"], typer.Option(help="Loss weights per class.")
    ] = "none",
    init_from: Annotated[
        str | None, typer.Option(help="Model artifact to start from (e.g. FCN-32s for a 16s).")
    ] = None,
    backbone_weights: Annotated[
        str | None, typer.Option(help="torchvision-format backbone state dict (path or URI).")
    ] = None,
    normalization: Annotated[
        Literal["imagenet", "caffe_bgr"], typer.Option(help="Input normalization.")
    ] = "imagenet",
    dropout: Annotated[float, typer.Option(help="Dropout after fc6/fc7 (VGG16 only).")] = 0.5,
    train_split: Annotated[str, typer.Option(help="Split trained on.")] = "train",
    val_split: Annotated[
        str | None, typer.Option(help="Split validated on each epoch ('' for none).")
    ] = "val",
    seed: Annotated[int, typer.Option(help="Seed of weights and augmentation.")] = 0,
    num_workers: Annotated[int, typer.Option(min=1, help="Ray Train workers (DDP ranks).")] = 2,
    use_gpu: Annotated[bool, typer.Option(help="One GPU per worker (nccl).")] = False,
    cpus_per_worker: Annotated[
        float | None,
        typer.Option(help="CPUs Ray reserves per worker (default: 1, less on a small machine)."),
    ] = None,
    threads_per_worker: Annotated[
        int | None, typer.Option(help="torch threads per worker (default: its CPUs).")
    ] = None,
    placement_strategy: Annotated[
        Literal["PACK", "SPREAD"],
        typer.Option(help="PACK: fill nodes in turn; SPREAD: workers on as many nodes as fit."),
    ] = "PACK",
    shuffle: Annotated[
        Literal["rows", "blocks", "none"],
        typer.Option(help="Per-epoch shuffle: rows (global), blocks (cheap, local buffer)."),
    ] = "rows",
    max_failures: Annotated[
        int, typer.Option(min=0, help="Restarts from the latest checkpoint.")
    ] = 2,
    run_id: Annotated[
        str | None, typer.Option(help="Run id; the same id resumes a crashed run.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a committed run of this id.")] = False,
    num_cpus: Annotated[
        int | None, typer.Option(help="CPUs of the embedded Ray (default: all; not on a cluster).")
    ] = None,
    fail_at: Annotated[
        str | None,
        typer.Option(hidden=True, help="Testing: RANK:EPOCH:STEP[:stall] fails a rank."),
    ] = None,
    fault_dir: Annotated[
        str | None, typer.Option(hidden=True, help="Testing: marker directory of the faults.")
    ] = None,
    s3_endpoint: S3Endpoint = None,
) -> None:
    """Train an FCN with DDP on Ray Train; write the model artifact and the run's tables.

    Checkpoints go to OUTPUT/checkpoints/RUN_ID each epoch; rerunning with the same --run-id
    after a crash resumes from the latest one.
    """
    from pipeline.datasets import DatasetConfig
    from pipeline.summary import print_class_iou, print_paper_table
    from pipeline.train import TrainConfig
    from pipeline.train import train as run_train

    config = TrainConfig(
        dataset_uri=dataset_uri,
        output_uri=output,
        run_id=run_id,
        model=model,
        backbone=backbone,
        num_classes=num_classes,
        dropout=dropout,
        train_split=train_split,
        val_split=val_split or None,
        crop_size=crop_size,
        scale_range=scale_range,
        hflip=hflip,
        pad_crops=pad_crops,
        normalization=normalization,
        batch_size=batch_size,
        grad_accum=grad_accum,
        epochs=epochs,
        optimizer=optimizer,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        schedule=schedule,
        warmup_steps=warmup_steps,
        amp=amp,
        class_weighting=class_weighting,
        init_from=init_from,
        backbone_weights=backbone_weights,
        seed=seed,
        num_workers=num_workers,
        use_gpu=use_gpu,
        cpus_per_worker=cpus_per_worker,
        threads_per_worker=threads_per_worker,
        placement_strategy=placement_strategy,
        shuffle=shuffle,
        max_failures=max_failures,
        overwrite=overwrite,
        dataset=DatasetConfig(storage=_storage(s3_endpoint)),
    )
    faults = None
    if fail_at is not None:
        train_at, stall = Faults.parse_train_at(fail_at)
        faults = _faults(
            output, run_id, fault_dir, s3_endpoint, train_at=train_at, train_stall=stall
        )
    console = Console()
    result = run_train(config, echo=typer.echo, num_cpus=num_cpus, faults=faults)
    label = f"{config.model_name} (epoch {result.epoch + 1})"
    if result.scores:
        print_paper_table(console, {label: result.scores}, title=f"val split, run {result.run_id}")
        print_class_iou(console, list(result.scores["iou"]), _class_names(result.model_uri))
    typer.echo(f"model: {result.model_uri}")
    typer.echo(f"trained in {result.seconds:.0f} s{' (resumed)' if result.resumed else ''}")


def _faults(
    output: str, run_id: str | None, fault_dir: str | None, s3_endpoint: str | None, **hooks: Any
) -> Faults:
    """The hidden test hooks, with their markers under ``--fault-dir`` (default
    ``OUTPUT/_faults/RUN_ID``)."""
    if fault_dir is None and run_id is None:
        raise ValueError("fault injection needs --run-id or --fault-dir")
    root = fault_dir or join(output, "_faults", str(run_id))
    return Faults(root=root, storage=_storage(s3_endpoint).with_environment(), **hooks)


def _class_names(model_uri: str) -> list[str]:
    from pipeline.artifacts import load_card

    return load_card(model_uri).class_names


@app.command()
def segment(
    input_uri: Annotated[
        str, typer.Argument(help="Dataset root, manifest, or any prefix of images.")
    ],
    model: Annotated[str, typer.Option("--model", "-m", help="Model artifact URI.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output root of the tables.")],
    run_id: Annotated[
        str | None, typer.Option(help="Run id; the same id completes a crashed run.")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Only this split (e.g. val).")] = None,
    layout: LayoutOption = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per actor call.")] = 8,
    actors: Annotated[int, typer.Option(min=1, help="Inference actors.")] = 1,
    use_gpu: Annotated[bool, typer.Option(help="A GPU per actor.")] = False,
    gpus_per_actor: Annotated[float, typer.Option(help="GPUs per actor (fractions share).")] = 1.0,
    cpus_per_actor: Annotated[float, typer.Option(help="CPUs Ray reserves per actor.")] = 1.0,
    threads_per_actor: Annotated[
        int | None, typer.Option(help="torch threads per actor (default: its CPUs).")
    ] = None,
    resize: Annotated[
        int | None, typer.Option(help="Run the model at this longer side (maps stay full size).")
    ] = None,
    palette: Annotated[bool, typer.Option(help="Label-map PNGs with the VOC palette.")] = False,
    write_png: Annotated[
        str | None, typer.Option(help="Also write label maps as PNGs under this prefix.")
    ] = None,
    rows_per_file: Annotated[int, typer.Option(min=1, help="Rows per Parquet file.")] = 2000,
    overwrite: Annotated[bool, typer.Option(help="Replace a committed run of this id.")] = False,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of the embedded Ray.")] = None,
    fail_after: Annotated[
        int | None, typer.Option(hidden=True, help="Testing: exit after N predictions.")
    ] = None,
    stall_actors_after: Annotated[
        int | None, typer.Option(hidden=True, help="Testing: actors stall after N batches.")
    ] = None,
    fault_dir: Annotated[
        str | None, typer.Option(hidden=True, help="Testing: marker directory of the faults.")
    ] = None,
    s3_endpoint: S3Endpoint = None,
) -> None:
    """Segment every image under INPUT_URI into label maps and metrics tables under OUTPUT."""
    from pipeline.datasets import DatasetConfig
    from pipeline.infer import SegmentConfig
    from pipeline.infer import segment as run_segment
    from pipeline.summary import print_class_iou, print_paper_table

    config = SegmentConfig(
        input_uri=input_uri,
        model_uri=model,
        output_uri=output,
        run_id=run_id,
        split=split,
        batch_size=batch_size,
        actors=actors,
        use_gpu=use_gpu,
        gpus_per_actor=gpus_per_actor,
        cpus_per_actor=cpus_per_actor,
        threads_per_actor=threads_per_actor,
        resize=resize,
        palette=palette,
        write_png=write_png,
        rows_per_file=rows_per_file,
        overwrite=overwrite,
        dataset=DatasetConfig(layout=layout, storage=_storage(s3_endpoint)),
    )
    faults = None
    if fail_after is not None or stall_actors_after is not None:
        faults = _faults(
            output,
            run_id,
            fault_dir,
            s3_endpoint,
            driver_exit_after=fail_after,
            actor_stall_after=stall_actors_after,
        )
    import ray.data

    # Ray Data's rich progress bars (its tqdm ones need tqdm, which is not installed).
    context = ray.data.DataContext.get_current()
    context.enable_rich_progress_bars = True
    context.use_ray_tqdm = False
    result = run_segment(config, echo=typer.echo, num_cpus=num_cpus, faults=faults)
    if result.scores is not None:
        console = Console()
        print_paper_table(
            console, {result.run_id: result.scores}, title="images with masks", label="run"
        )
        print_class_iou(console, result.scores["iou"], result.class_names)


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
) -> None:
    """Run SQL over the result tables of the committed runs (local or S3).

    \b
    Example:
        fcnpipe query OUT "SELECT class_name, avg(iou) FROM class_metrics GROUP BY 1"
    """
    from pipeline.report import Results, choose_format, encode_result, print_result
    from pipeline.storage import resolve, write_bytes

    chosen = choose_format(fmt, out)
    options = _storage(s3_endpoint)
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
def runs(out_uri: OutUri, s3_endpoint: S3Endpoint = None) -> None:
    """List the committed runs under an output root, oldest first."""
    from pipeline.report import Results, print_runs

    with Results(out_uri, _storage(s3_endpoint)) as results:
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
) -> None:
    """Print a run's paper metrics, per-class IoU and best and worst images; --html writes
    a report with charts, training curves and overlays."""
    from pipeline.report import Results, print_report

    with Results(out_uri, _storage(s3_endpoint)) as results:
        print_report(Console(), results, run_id, num_images=images)
        if html is not None:
            typer.echo(f"report:   {results.write_html(run_id, html, num_images=images)}")


@app.command()
def show(
    out_uri: OutUri,
    run_id: Annotated[str, typer.Argument(help="A committed segment run.")],
    image_id: Annotated[str, typer.Argument(help="An image the run segmented.")],
    out: Annotated[str, typer.Option("--out", "-o", help="PNG to write (path or URI).")],
    s3_endpoint: S3Endpoint = None,
) -> None:
    """Write one image's overlay: image | ground truth | prediction (image | prediction
    without a mask)."""
    from pipeline.report import Results
    from pipeline.storage import resolve, write_bytes

    options = _storage(s3_endpoint)
    with Results(out_uri, options) as results:
        panel = results.panel(run_id, image_id)
    target = resolve(out, options)
    write_bytes(target, panel.to_png())
    score = f", mean IoU {panel.mean_iou:.3f}" if panel.mean_iou is not None else ""
    typer.echo(f"wrote {target.uri}: {panel.parts}{score}")


@bench_app.command("train")
def bench_train(
    num_images: Annotated[int, typer.Option(min=4, help="Synthetic training images.")] = 64,
    size: Annotated[int, typer.Option(min=32, help="Image side (crops are whole images).")] = 96,
    model: Annotated[str, typer.Option(help="Model name, e.g. fcn8s_resnet18.")] = "fcn8s_resnet18",
    batch_size: Annotated[int, typer.Option(min=2, help="Global batch.")] = 8,
    epochs: Annotated[int, typer.Option(min=2, help="Epochs per way (first one excluded).")] = 3,
    threads: Annotated[int, typer.Option(min=2, help="torch threads in all.")] = 2,
) -> None:
    """Training images/s: plain PyTorch vs Ray Train 1 worker vs 2 DDP workers, one run."""
    from pipeline.experiments import bench_train as run_bench
    from pipeline.experiments import format_bench_train

    result = run_bench(
        num_images=num_images,
        size=size,
        model=model,
        batch_size=batch_size,
        epochs=epochs,
        threads=threads,
        echo=typer.echo,
    )
    typer.echo(format_bench_train(result))


@bench_app.command("segment")
def bench_segment(
    num_images: Annotated[int, typer.Option(min=2, help="Images of the speed runs.")] = 48,
    size: Annotated[int, typer.Option(min=32, help="Their side.")] = 320,
    model: Annotated[str, typer.Option(help="Model of the speed runs.")] = "fcn8s_vgg16",
    threads: Annotated[int, typer.Option(min=1, help="torch threads (loop and actor).")] = 2,
    scale: Annotated[int, typer.Option(min=2, help="Image-count factor of the memory run.")] = 10,
    local: Annotated[bool, typer.Option(help="Read local files instead of a local S3.")] = False,
) -> None:
    """Segmentation images/s: bare model loop vs the whole pipeline; peak memory at scale."""
    from pipeline.experiments import bench_segment as run_bench
    from pipeline.experiments import format_bench_segment

    result = run_bench(
        num_images=num_images,
        size=size,
        model=model,
        threads=threads,
        scale=scale,
        use_s3=not local,
        echo=typer.echo,
    )
    typer.echo(format_bench_segment(result))


@experiment_app.command("skips")
def experiment_skips(
    output: Annotated[str, typer.Option("--output", "-o", help="Output root of the runs.")],
    dataset_uri: Annotated[
        str | None, typer.Option("--dataset", help="Dataset (default: synthetic shapes).")
    ] = None,
    num_images: Annotated[int, typer.Option(min=8, help="Synthetic images.")] = 400,
    size: Annotated[int, typer.Option(min=32, help="Synthetic image side.")] = 128,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs per variant.")] = 12,
    backbone: Annotated[str, typer.Option(help="Backbone of all three.")] = "resnet18",
    num_workers: Annotated[int, typer.Option(min=1, help="DDP workers per run.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of data and runs.")] = 0,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of the embedded Ray.")] = None,
) -> None:
    """FCN-32s vs FCN-16s vs FCN-8s, same backbone, budget and data: the paper's Table 2."""
    from pipeline.cluster import ensure_ray
    from pipeline.experiments import SkipsExperiment, run_skips
    from pipeline.summary import print_paper_table

    experiment = SkipsExperiment(
        output_uri=output,
        dataset_uri=dataset_uri,
        num_images=num_images,
        size=size,
        epochs=epochs,
        backbone=backbone,
        num_workers=num_workers,
        seed=seed,
    )
    ensure_ray(num_cpus=num_cpus)
    results = run_skips(experiment, echo=typer.echo)
    print_paper_table(
        Console(),
        {f"{head}_{backbone}": result.scores for head, result in results.items()},
        title=f"skip architectures, val split, {epochs} epochs each",
    )
    for head, result in results.items():
        typer.echo(f"{head}: {result.model_uri} ({result.seconds:.0f} s)")


def run(typer_app: typer.Typer, user_errors: tuple[type[BaseException], ...] = USER_ERRORS) -> None:
    """Run a Typer app, turning user errors into one line on stderr and exit code 2.

    Args:
        typer_app: the application to run.
        user_errors: exception types reported as one line (set FCNPIPE_DEBUG=1 to
            see their tracebacks as well).
    """
    # Ray makes every worker re-run `uv run` in a copy of the working directory when the
    # driver was started by `uv run`; our workers use this interpreter's environment.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    try:
        typer_app()
    except Exception as exc:
        lazy = tuple(
            getattr(sys.modules[module], name)
            for module, name in _LAZY_USER_ERRORS
            if module in sys.modules
        )
        if not isinstance(exc, user_errors + lazy) or os.environ.get("FCNPIPE_DEBUG"):
            raise
        # Escaped: paths and keys may hold [brackets] that Rich would read as markup.
        message = " ".join(str(exc).split())
        err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(2)
