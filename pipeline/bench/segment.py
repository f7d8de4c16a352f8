"""``fcnpipe bench segment``: segmentation images/s, the bare model loop vs the whole pipeline.

Usage:
    fcnpipe bench segment [--num-images 48 --size 320 --model fcn8s_vgg16]
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcn.models import build_model
from pipeline.compute import Precision
from pipeline.data.batches import samples_from_batch
from pipeline.data.layouts import load_manifest
from pipeline.data.reading import DatasetConfig, load_batch
from pipeline.data.synthetic import write_synthetic
from pipeline.segment.config import SegmentCompute
from pipeline.segment.engines import Backend
from pipeline.storage import join

__all__ = ["bench_segment", "format_bench_segment"]


def bench_segment(
    *,
    num_images: int = 48,
    size: int = 320,
    model: str = "fcn8s_vgg16",
    threads: int = 2,
    scale: int = 10,
    memory_model: str = "fcn8s_resnet18",
    memory_size: int = 128,
    root: str,
    precision: Precision = "auto",
    backend: Backend = "auto",
    reference: bool = True,
    photos: int = 12,
    photo_size: tuple[int, int] = (2000, 3000),
    photo_model: str = "fcn8s_resnet18",
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Segmentation images/s: a bare model loop vs the whole pipeline, plus memory at scale.

    (a) calls the model on already-decoded, normalized tensors in one Ray worker process (the
    engine an actor runs, without Ray Data); (b) runs
    :func:`pipeline.segment.driver.segment` from the bucket's bytes to committed Parquet with one
    actor of the same threads (Ray already started, so its start-up is not counted; the
    actor's model load is). Same model, images and threads, one run. Then the stages (b)
    adds are timed alone on the same images: read + decode, PNG encode of the label maps.
    Last, the pipeline runs again on ``memory_model`` over N and ``scale`` x N images and
    the peak resident memory (sampled every 0.2 s) of the driver and of an actor process
    is reported for each (streaming: they should stay flat).

    Args:
        num_images: Images of (a) and (b).
        size: Their side.
        model: Model of (a) and (b) (random weights: the cost is the same).
        threads: torch threads of the bare loop and of the actor.
        scale: Image-count factor of the memory runs.
        memory_model: Model of the memory runs (a light one: they are about memory).
        memory_size: Image side of the memory runs.
        precision: The precision policy of (a), (b) and the memory runs
            (:mod:`pipeline.compute`).
        backend: The engine of (a), (b) and the memory runs
            (:mod:`pipeline.segment.engines`).
        reference: Also run (c), the pipeline as it ran before the precision policy and the
            engines (torch, fp32, NCHW), for the ratio b/c.
        photos: Images of the multi-megapixel case (d): the bare loop with all the machine's
            cores next to the pipeline with every option left to its plan
            (:mod:`pipeline.plan`); 0 skips it.
        photo_size: Their (height, width).
        photo_model: The model of (d) (the demo's).
        root: Scratch URI for the data, models and tables (a local directory, or an
            ``s3://`` prefix: the CLI starts a SeaweedFS server on 127.0.0.1 for it).
        echo: Where progress lines go.
    """
    import ray

    from pipeline.cluster import ensure_ray
    from pipeline.config import make
    from pipeline.segment.config import SegmentConfig
    from pipeline.segment.driver import segment

    with contextlib.ExitStack() as stack:
        if not ray.is_initialized():  # only a Ray this call starts is this call's to stop
            stack.callback(ray.shutdown)
        data = join(root, "data")
        write_synthetic(data, num_images=num_images, size=size, val_fraction=0.0)
        model_uri = _random_model(join(root, "model"), model, onnx=backend != "torch")

        echo(
            f"(a) bare loop: {model} on {num_images} decoded images of {size} px, {threads} threads"
        )
        compute = SegmentCompute(precision=precision, backend=backend)
        # In a Ray worker, as the actor: the same process environment (pipeline.cluster).
        # The machine's cores: (d)'s pipeline is sized from them, as a user's run is.
        ensure_ray(num_cpus=max(2, os.cpu_count() or 1))
        bare, stages, plan = ray.get(
            ray.remote(num_cpus=1)(_bare_segment_loop).remote(data, model_uri, threads, compute)
        )
        echo(f"    compute: {plan}")

        echo("(b) full pipeline: bucket bytes -> committed Parquet, 1 actor")
        began = time.perf_counter()
        result = segment(
            make(
                SegmentConfig,
                input_uri=data,
                model_uri=model_uri,
                output_uri=join(root, "out"),
                run_id="bench",
                batch_size=1,
                actors=1,
                cpus_per_actor=1.0,
                threads_per_actor=threads,
                precision=precision,
                backend=backend,
            ),
            echo=echo,
        )
        full = result.num_images / (time.perf_counter() - began)
        steady = result.steady_images_per_s or full
        before = None
        if reference:
            echo("(c) full pipeline with torch fp32 NCHW (no precision policy, no engines)")
            began = time.perf_counter()
            old = segment(
                make(
                    SegmentConfig,
                    input_uri=data,
                    model_uri=model_uri,
                    output_uri=join(root, "out"),
                    run_id="bench-fp32",
                    batch_size=1,
                    actors=1,
                    cpus_per_actor=1.0,
                    threads_per_actor=threads,
                    backend="torch",
                    precision="fp32",
                    memory_format="contiguous",
                ),
                echo=echo,
            )
            before = old.steady_images_per_s or old.num_images / (time.perf_counter() - began)

        photo = None
        if photos:
            photo_uri = _random_model(
                join(root, "photo-model"), photo_model, onnx=backend != "torch"
            )
            photo = _photo_case(root, photo_uri, photos, photo_size, compute, echo=echo)
            photo["model"] = photo_model

        memory = []
        memory_uri = _random_model(
            join(root, "memory-model"), memory_model, onnx=backend != "torch"
        )
        for count in (num_images, num_images * scale):
            mem_data = join(root, f"mem-{count}")
            write_synthetic(mem_data, num_images=count, size=memory_size, val_fraction=0.0)
            echo(f"memory run: {count} images of {memory_size} px, {memory_model}")
            with _PeakRss("MapWorker") as actors, _PeakRss(None) as driver:
                segment(
                    make(
                        SegmentConfig,
                        input_uri=mem_data,
                        model_uri=memory_uri,
                        output_uri=join(root, "out"),
                        run_id=f"mem-{count}",
                        actors=1,
                        cpus_per_actor=1.0,
                        threads_per_actor=threads,
                        precision=precision,
                        backend=backend,
                    ),
                    echo=echo,
                )
            memory.append(
                {"images": count, "driver_mb": driver.peak_mb, "actors_mb": actors.peak_mb}
            )
    return {
        "model": model,
        "num_images": num_images,
        "size": size,
        "threads": threads,
        "source": "s3" if root.startswith("s3://") else "local",
        "compute": plan,
        "pipeline_engine": f"{result.engine} {result.precision}",
        "bare": bare,
        "full": full,
        "ratio": full / bare,
        "steady": steady,
        "steady_ratio": steady / bare,
        "reference": before,
        "stages_ms": stages,
        "photos": photo,
        "memory": memory,
    }


def format_bench_segment(result: dict[str, Any]) -> str:
    """The segmentation benchmark's figures as a few aligned lines."""
    stages = result["stages_ms"]
    lines = [
        f"model {result['model']}, {result['num_images']} images of {result['size']} px, "
        f"{result['threads']} threads, read from {result['source']}",
        f"engine (a): {result['compute']}",
        f"engine (b): {result['pipeline_engine']}",
        f"(a) bare engine loop on decoded images  {result['bare']:8.2f} img/s",
        f"(b) full pipeline, bytes -> Parquet     {result['full']:8.2f} img/s",
        f"b/a                                     {result['ratio']:8.2f}",
        f"(b) once the actor is up (first to last row) {result['steady']:8.2f} img/s, "
        f"b/a {result['steady_ratio']:.2f}",
        "per image, timed alone: "
        + ", ".join(f"{name} {value:.1f} ms" for name, value in stages.items()),
    ]
    if result["reference"]:
        lines.append(
            f"(c) torch fp32 NCHW pipeline, steady {result['reference']:8.2f} img/s; "
            f"b/c {result['steady'] / result['reference']:.2f}"
        )
    photo = result.get("photos")
    if photo:
        lines += [
            f"(d) {photo['model']} on {photo['images']} photos of {photo['height']}x"
            f"{photo['width']} ({photo['megapixels']:.1f} MP); {photo['plan']}",
            f"(d) bare engine loop, {photo['threads']} threads    {photo['bare']:8.3f} img/s "
            f"({photo['engine']})",
            f"(d) pipeline, every option auto       {photo['full']:8.3f} img/s whole run, "
            f"{photo['steady']:.3f} steady; steady/bare {photo['steady'] / photo['bare']:.2f}, "
            f"whole/bare {photo['full'] / photo['bare']:.2f}",
            f"(d) actor peak {photo['actors_mb']:.0f} MB, driver peak {photo['driver_mb']:.0f} MB",
        ]
    for row in result["memory"]:
        lines.append(
            f"memory, {row['images']:5d} images: driver peak {row['driver_mb']:.0f} MB, "
            f"actor peak {row['actors_mb']:.0f} MB"
        )
    return "\n".join(lines)


def _photo_case(
    root: str,
    model_uri: str,
    count: int,
    size: tuple[int, int],
    compute: SegmentCompute,
    *,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """(d): multi-megapixel JPEGs, the bare engine loop on all cores vs the default pipeline."""
    import ray

    from pipeline.config import make
    from pipeline.segment.config import SegmentConfig
    from pipeline.segment.driver import segment

    data = join(root, "photos")
    write_synthetic(data, num_images=count, size=size, val_fraction=0.0)
    threads = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    echo(f"(d) bare loop: {count} photos of {size[0]}x{size[1]}, {threads} threads")
    bare, _, engine = ray.get(
        ray.remote(num_cpus=threads)(_bare_segment_loop).remote(data, model_uri, threads, compute)
    )
    echo("(d) full pipeline, every scaling option auto")
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        echo(line)

    began = time.perf_counter()
    with _PeakRss("MapWorker") as actors, _PeakRss(None) as driver:
        result = segment(
            make(
                SegmentConfig,
                input_uri=data,
                model_uri=model_uri,
                output_uri=join(root, "out"),
                run_id="bench-photos",
                precision=compute.precision,
                backend=compute.backend,
            ),
            echo=log,
        )
    full = result.num_images / (time.perf_counter() - began)
    return {
        "images": count,
        "height": size[0],
        "width": size[1],
        "megapixels": size[0] * size[1] / 2**20,
        "threads": threads,
        "engine": engine,
        "plan": next((line for line in lines if line.startswith("segment: ")), "?"),
        "bare": bare,
        "full": full,
        "steady": result.steady_images_per_s or full,
        "actors_mb": actors.peak_mb,
        "driver_mb": driver.peak_mb,
    }


def _random_model(uri: str, name: str, *, onnx: bool = False) -> str:
    """A model artifact with random score layers (its label maps vary like a trained one's),
    with its ONNX export where ``onnx``."""
    from fcn.synthetic import CLASS_NAMES
    from pipeline.artifacts import ModelCard, save_model

    head, _, backbone = name.partition("_")
    torch.manual_seed(0)
    net = build_model(name, len(CLASS_NAMES))
    with torch.no_grad():
        for conv in (net.head.score_fr, *net.head.skip_scores):
            conv.weight.normal_(std=0.01)
    card = ModelCard(
        run_id="bench",
        architecture=head,
        backbone=backbone,
        num_classes=len(CLASS_NAMES),
        class_names=list(CLASS_NAMES),
        model_options={"dropout": 0.5} if backbone == "vgg16" else {},
        normalization={"name": "imagenet"},
    )
    save_model(net, card, uri)
    if onnx:
        from pipeline.export import export_onnx

        export_onnx(uri)
    return uri


def _bare_segment_loop(
    data: str, model_uri: str, threads: int, compute: SegmentCompute
) -> tuple[float, dict[str, float], str]:
    """Images/s of the engine alone (what an actor runs, without Ray Data), the per-image cost
    of the stages around it, and the engine the policy resolved to."""
    from fcn.palette import encode_label_png
    from pipeline.segment.engines import load_engine

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        manifest = load_manifest(data)
        began = time.perf_counter()
        samples = samples_from_batch(load_batch(manifest, config=DatasetConfig()))
        decode_ms = (time.perf_counter() - began) * 1000 / len(samples)
        engine = load_engine(
            model_uri,
            backend=compute.backend,
            compute=compute,
            device=torch.device("cpu"),
            threads=threads,
        )
        inputs = [np.ascontiguousarray(s.image.transpose(2, 0, 1)[None]) for s in samples]
        engine.labels(inputs[0])  # warm-up
        began = time.perf_counter()
        labels = [engine.labels(x)[0] for x in inputs]
        seconds = time.perf_counter() - began
        began = time.perf_counter()
        for label in labels:
            encode_label_png(label.astype(np.uint8))
        png_ms = (time.perf_counter() - began) * 1000 / len(labels)
        stages = {"model": seconds * 1000 / len(inputs), "read+decode": decode_ms, "png": png_ms}
        return len(inputs) / seconds, stages, engine.describe()
    finally:
        torch.set_num_threads(previous)


class _PeakRss:
    """The largest resident memory (VmRSS, sampled) of any process whose command line holds
    ``marker``, or of this process when ``marker`` is None (Linux ``/proc``)."""

    def __init__(self, marker: str | None, interval_s: float = 0.2) -> None:
        self.marker = None if marker is None else marker.encode()
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.marker is None:
                procs = [Path("/proc/self")]
            else:
                procs = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
            for proc in procs:
                try:
                    if (
                        self.marker is not None
                        and self.marker not in (proc / "cmdline").read_bytes()
                    ):
                        continue
                    for line in (proc / "status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            self.peak_mb = max(self.peak_mb, int(line.split()[1]) / 1024)
                except OSError:
                    continue
