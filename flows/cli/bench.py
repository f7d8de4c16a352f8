"""``fcnpipe bench read | train | segment | incremental | tiles | tables``, ``fcnpipe experiment
skips``.

The benchmarks that read from S3 start a SeaweedFS server of their own on 127.0.0.1 (random
credentials, stopped after) unless given URIs: that development helper lives in
``infra.local``, which only this entry tree imports.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from flows.cli.common import NumCpus, S3Endpoint, bench_app, experiment_app, storage_options
from pipeline.compute import PRECISIONS, Precision
from pipeline.errors import ConfigError
from pipeline.segment.engines import BACKENDS, Backend

__all__: list[str] = []


def _precision(text: str) -> Precision:
    if text not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {text!r}")
    return text  # type: ignore[return-value]  # checked above


def _backend(text: str) -> Backend:
    if text not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {text!r}")
    return text  # type: ignore[return-value]  # checked above


@contextlib.contextmanager
def _scratch_root(tmp: Path, use_s3: bool) -> Iterator[str]:
    """A scratch URI for a benchmark: a local S3 server's bucket, or a local directory."""
    if not use_s3:
        yield str(tmp / "local")
        return
    from infra.local.seaweedfs import scratch_s3

    with scratch_s3(tmp / "s3", "bench"):  # before Ray starts: its workers inherit the env
        yield "s3://bench"


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

    from pipeline.bench.read import bench_read as run_bench
    from pipeline.bench.read import format_bench
    from pipeline.data.reading import DatasetConfig
    from pipeline.data.synthetic import write_synthetic

    if (local_uri is None) != (s3_uri is None):
        raise ConfigError("give both --local-uri and --s3-uri (the same dataset twice), or neither")
    config = DatasetConfig(storage=storage_options(s3_endpoint))
    with tempfile.TemporaryDirectory(prefix="fcnpipe-bench-") as tmp:
        if local_uri is not None and s3_uri is not None:
            result = run_bench(local_uri, s3_uri, num_images=num_images, config=config)
        else:  # the same synthetic bytes on local disk and a local S3 server
            local_uri = str(Path(tmp) / "local")
            write_synthetic(local_uri, num_images=num_images, size=size)
            with _scratch_root(Path(tmp), use_s3=True) as root:
                s3_uri = f"{root}/data"
                write_synthetic(s3_uri, num_images=num_images, size=size)
                try:
                    result = run_bench(local_uri, s3_uri, num_images=num_images, config=config)
                finally:
                    ray.shutdown()
    typer.echo(format_bench(result))


BackendOption = Annotated[str, typer.Option(help="Engine: auto, torch, onnxruntime or openvino.")]
PrecisionOption = Annotated[
    str, typer.Option(help="Precision policy: auto, fp32, bf16 or fp16 (see --help of train).")
]


@bench_app.command("model")
def bench_model(
    model: Annotated[str, typer.Option(help="Model name, e.g. fcn8s_resnet18.")] = "fcn8s_vgg16",
    size: Annotated[int, typer.Option(min=32, help="Input side.")] = 500,
    batch: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 1,
    threads: Annotated[int, typer.Option(min=1, help="torch threads.")] = 2,
    precisions: Annotated[
        str, typer.Option("--precisions", help="Comma-separated: fp32, bf16, fp16.")
    ] = "fp32,bf16",
    compile: Annotated[bool, typer.Option(help="Also time each variant compiled.")] = False,
    seconds: Annotated[float, typer.Option(min=0.1, help="Timing per variant.")] = 3.0,
    in_process: Annotated[
        bool,
        typer.Option(
            help="Run here, with this process's malloc settings, not in a Ray worker (which "
            "gets pipeline.cluster.WORKER_ENV)."
        ),
    ] = False,
) -> None:
    """The model alone in each precision x layout: images/s, GFLOP/s, ratio to matmul peak."""
    from pipeline.bench.model import bench_model as run_bench
    from pipeline.bench.model import format_bench_model

    chosen = tuple(p.strip() for p in precisions.split(",") if p.strip())
    bad = [p for p in chosen if p not in ("fp32", "bf16", "fp16")]
    if bad or not chosen:
        raise ConfigError(f"--precisions: expected fp32, bf16 or fp16, got {precisions!r}")
    import ray

    from pipeline.cluster import ensure_ray

    settings: dict[str, Any] = {
        "model": model,
        "size": size,
        "batch": batch,
        "threads": threads,
        "precisions": chosen,
        "compile": compile,
        "seconds": seconds,
    }
    if in_process:
        result = run_bench(**settings, echo=typer.echo)
    else:
        # In a Ray worker: the process environment the actors and training workers run in.
        ensure_ray(num_cpus=threads)
        task: Any = ray.remote(num_cpus=threads)(run_bench)
        result = ray.get(task.remote(**settings))
    typer.echo(format_bench_model(result))


@bench_app.command("precision")
def bench_precision(
    model_uri: Annotated[str, typer.Argument(help="A trained model artifact.")],
    dataset_uri: Annotated[str, typer.Argument(help="A dataset with masks (root or manifest).")],
    split: Annotated[str, typer.Option(help="Split to segment ('' for every image).")] = "val",
    precision: PrecisionOption = "auto",
    backend: BackendOption = "auto",
    threads: Annotated[int, typer.Option(min=1, help="torch threads.")] = 2,
) -> None:
    """A trained model's label maps and metrics in a precision, against fp32 NCHW."""
    import ray

    from pipeline.bench.precision import bench_precision as run_bench
    from pipeline.bench.precision import format_bench_precision
    from pipeline.cluster import ensure_ray

    ensure_ray(num_cpus=threads)  # in a Ray worker, as the actors run
    task: Any = ray.remote(num_cpus=threads)(run_bench)
    result = ray.get(
        task.remote(
            model_uri,
            dataset_uri,
            split=split or None,
            precision=_precision(precision),
            backend=_backend(backend),
            threads=threads,
        )
    )
    typer.echo(format_bench_precision(result))


@bench_app.command("train")
def bench_train(
    num_images: Annotated[int, typer.Option(min=4, help="Synthetic training images.")] = 64,
    size: Annotated[int, typer.Option(min=32, help="Image side (crops are whole images).")] = 96,
    model: Annotated[str, typer.Option(help="Model name, e.g. fcn8s_resnet18.")] = "fcn8s_resnet18",
    batch_size: Annotated[int, typer.Option(min=2, help="Global batch.")] = 8,
    epochs: Annotated[int, typer.Option(min=2, help="Epochs per way (first one excluded).")] = 3,
    threads: Annotated[int, typer.Option(min=2, help="torch threads in all.")] = 2,
    precision: PrecisionOption = "auto",
) -> None:
    """Training images/s: plain PyTorch vs Ray Train 1 worker vs 2 DDP workers, one run."""
    from pipeline.bench.train import bench_train as run_bench
    from pipeline.bench.train import format_bench_train

    result = run_bench(
        num_images=num_images,
        size=size,
        model=model,
        batch_size=batch_size,
        epochs=epochs,
        threads=threads,
        precision=_precision(precision),
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
    precision: PrecisionOption = "auto",
    backend: BackendOption = "auto",
    photos: Annotated[
        int, typer.Option(min=0, help="Photos of the multi-megapixel case (d); 0 skips it.")
    ] = 12,
    photo_size: Annotated[
        str, typer.Option(metavar="HxW", help="Their size, e.g. 2000x3000.")
    ] = "2000x3000",
    photo_model: Annotated[str, typer.Option(help="Model of (d).")] = "fcn8s_resnet18",
) -> None:
    """Segmentation images/s: bare model loop vs the whole pipeline (one actor, then every
    option auto on multi-megapixel photos); peak memory at scale."""
    from pipeline.bench.segment import bench_segment as run_bench
    from pipeline.bench.segment import format_bench_segment

    with (
        tempfile.TemporaryDirectory(prefix="fcnpipe-bench-seg-") as tmp,
        _scratch_root(Path(tmp), use_s3=not local) as root,
    ):
        result = run_bench(
            num_images=num_images,
            size=size,
            model=model,
            threads=threads,
            scale=scale,
            root=root,
            precision=_precision(precision),
            backend=_backend(backend),
            photos=photos,
            photo_size=_size(photo_size),
            photo_model=photo_model,
            echo=typer.echo,
        )
    typer.echo(format_bench_segment(result))


@bench_app.command("incremental")
def bench_incremental(
    num_objects: Annotated[int, typer.Option(min=1, help="Images of the full run.")] = 2000,
    added: Annotated[int, typer.Option(min=1, help="Images added before the second run.")] = 20,
    size: Annotated[int, typer.Option(min=32, help="Their side.")] = 64,
    model: Annotated[str, typer.Option(help="Model (random weights).")] = "fcn8s_resnet18",
    local: Annotated[bool, typer.Option(help="A local directory instead of a local S3.")] = False,
    num_cpus: NumCpus = None,
) -> None:
    """Incremental segmentation (--stream): a full run of a bucket vs a run after a few new
    objects; listing time per 1,000 keys."""
    from pipeline.bench.incremental import bench_incremental as run_bench
    from pipeline.bench.incremental import format_bench_incremental

    with (
        tempfile.TemporaryDirectory(prefix="fcnpipe-bench-inc-") as tmp,
        _scratch_root(Path(tmp), use_s3=not local) as root,
    ):
        result = run_bench(
            num_objects=num_objects,
            added=added,
            size=size,
            model=model,
            root=root,
            num_cpus=num_cpus,
            echo=typer.echo,
        )
    typer.echo(format_bench_incremental(result))


@bench_app.command("tiles")
def bench_tiles(
    scene_sizes: Annotated[
        str, typer.Option(help="Sides of the square scenes, comma-separated (one run each).")
    ] = "10000,20000",
    tile: Annotated[int, typer.Option(min=32, help="Window side (and the small images').")] = 1024,
    overlap: Annotated[int, typer.Option(min=0, help="Rows/columns windows share.")] = 128,
    small_images: Annotated[
        int | None,
        typer.Option(min=1, help="Images of the small run [default: the first scene's pixels]."),
    ] = None,
    model: Annotated[str, typer.Option(help="The model (random weights).")] = "fcn8s_resnet18",
    actors: Annotated[int, typer.Option(min=1, help="Inference actors of every run.")] = 2,
    local: Annotated[bool, typer.Option(help="Local files instead of a local S3.")] = False,
    precision: PrecisionOption = "auto",
    backend: BackendOption = "auto",
) -> None:
    """Tiled segmentation of huge scenes: MP/s next to small images, peak memory per scene
    size (100 and 400 MP by default: a few minutes on 2 cores)."""
    from pipeline.bench.tiles import bench_tiles as run_bench
    from pipeline.bench.tiles import format_bench_tiles

    try:
        sides = [int(side) for side in scene_sizes.split(",")]
    except ValueError:
        raise typer.BadParameter(f"expected sides like 10000,20000, got {scene_sizes!r}") from None
    with (
        tempfile.TemporaryDirectory(prefix="fcnpipe-bench-tiles-") as tmp,
        _scratch_root(Path(tmp), use_s3=not local) as root,
    ):
        result = run_bench(
            root=root,
            scene_sizes=sides,
            tile=tile,
            overlap=overlap,
            small_images=small_images,
            model=model,
            actors=actors,
            precision=_precision(precision),
            backend=_backend(backend),
            echo=typer.echo,
        )
    typer.echo(format_bench_tiles(result))


def _size(text: str) -> tuple[int, int]:
    """``HxW`` as (height, width), or a one-line error."""
    height, _, width = text.lower().partition("x")
    try:
        size = int(height), int(width)
    except ValueError:
        raise typer.BadParameter(f"expected HxW (e.g. 2000x3000), got {text!r}") from None
    if min(size) < 32:
        raise typer.BadParameter(f"photos must be at least 32x32, got {text!r}")
    return size


@bench_app.command("tables")
def bench_tables(
    num_images: Annotated[int, typer.Option(min=100, help="Synthetic images per run.")] = 4000,
    size: Annotated[int, typer.Option(min=32, help="Side of their label maps.")] = 384,
    rows_per_file: Annotated[int, typer.Option(min=1, help="Images per data file.")] = 500,
    actor_rate: Annotated[
        float, typer.Option(min=1.0, help="One actor's images/s, for the cluster sizes.")
    ] = 300.0,
    local: Annotated[bool, typer.Option(help="Tables on local disk, not a local S3.")] = False,
) -> None:
    """The driver's ceiling (images/s, MB/s of label maps) with the single-driver design and
    with workers writing the data files; the cluster size at which each saturates."""
    from pipeline.bench.tables import bench_tables as run_bench
    from pipeline.bench.tables import format_bench_tables

    with (
        tempfile.TemporaryDirectory(prefix="fcnpipe-bench-tables-") as tmp,
        _scratch_root(Path(tmp), use_s3=not local) as root,
    ):
        result = run_bench(
            num_images=num_images,
            size=size,
            rows_per_file=rows_per_file,
            actor_rate=actor_rate,
            root=root,
            echo=typer.echo,
        )
    typer.echo(format_bench_tables(result))


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
    num_cpus: NumCpus = None,
) -> None:
    """FCN-32s vs FCN-16s vs FCN-8s, same backbone, budget and data: the paper's Table 2."""
    from pipeline.cluster import ensure_ray
    from pipeline.experiments import SkipsExperiment, run_skips
    from pipeline.results.output import print_paper_table

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
