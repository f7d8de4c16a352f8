"""``fcnpipe bench tiles``: tiled segmentation of huge scenes next to small images.

Usage:
    fcnpipe bench tiles [--scene-sizes 10000,20000 --tile 1024 --overlap 128 --actors 2]

One run: the same model and actors segment small images (one tile each) and then each
scene (a tiled TIFF of ``side x side`` pixels, tiled into ``tile`` windows). It reports
megapixels/s of each, their ratio, and the peak resident memory of the driver, of the
largest inference actor and of the largest other Ray worker (reads, strips, assembly) for
every scene size: tiled segmentation should run at the small images' rate, with memory
that stays flat as the scene grows.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.bench.segment import _PeakRss, _random_model
from pipeline.compute import Precision
from pipeline.data.synthetic import write_scenes, write_synthetic
from pipeline.segment.engines import Backend
from pipeline.storage import join

__all__ = ["bench_tiles", "format_bench_tiles"]


def bench_tiles(
    *,
    root: str,
    scene_sizes: Sequence[int] = (10_000, 20_000),
    tile: int = 1024,
    overlap: int = 128,
    small_images: int | None = None,
    model: str = "fcn8s_resnet18",
    actors: int = 2,
    precision: Precision = "auto",
    backend: Backend = "auto",
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Megapixels/s and peak memory of tiled segmentation (Ray must be running).

    Args:
        root: Scratch URI for data, model and outputs.
        scene_sizes: Sides of the square scenes, one run each.
        tile: Window side of the tiled runs (and the small images' side).
        overlap: Rows and columns shared by neighbouring windows.
        small_images: Images of the small-image run; None: as many as make the first
            scene's pixels (both runs' start-up then weigh alike in their MP/s).
        model: The model (random weights: the cost is the same).
        actors: Inference actors of every run.
        precision: Precision policy (:mod:`pipeline.compute`).
        backend: Engine (:mod:`pipeline.segment.engines`).
        echo: Progress lines.
    """
    import ray

    from pipeline.cluster import ensure_ray

    with contextlib.ExitStack() as stack:
        if not ray.is_initialized():  # only a Ray this call starts is this call's to stop
            stack.callback(ray.shutdown)
        ensure_ray(num_cpus=max(2, os.cpu_count() or 1))
        return _bench(
            root, scene_sizes, tile, overlap, small_images, model, actors, precision, backend,
            echo,
        )  # fmt: skip


def _bench(
    root: str,
    scene_sizes: Sequence[int],
    tile: int,
    overlap: int,
    small_images: int | None,
    model: str,
    actors: int,
    precision: Precision,
    backend: Backend,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    from pipeline.config import make
    from pipeline.segment.config import SegmentConfig
    from pipeline.segment.driver import segment

    model_uri = _random_model(join(root, "model"), model, onnx=backend != "torch")
    common = {
        "model_uri": model_uri,
        "output_uri": join(root, "out"),
        "actors": actors,
        "precision": precision,
        "backend": backend,
    }

    def run(data: str, run_id: str, **tiling: int) -> tuple[Any, dict[str, float]]:
        with (
            _PeakRss("MapWorker") as actor,
            _PeakRss("ray::") as worker,
            _PeakRss(None) as driver,
        ):
            result = segment(
                make(SegmentConfig, input_uri=data, run_id=run_id, **common, **tiling),
                echo=echo,
            )
        if result.num_errors:
            raise RuntimeError(f"bench run {run_id} had {result.num_errors} error rows")
        peaks = {"driver": driver.peak_mb, "actor": actor.peak_mb, "worker": worker.peak_mb}
        return result, peaks

    if small_images is None:
        small_images = max(1, round(scene_sizes[0] ** 2 / tile**2))
    small = join(root, "small")
    write_synthetic(small, num_images=small_images, size=tile, val_fraction=0.0)
    echo(f"small images: {small_images} of {tile} x {tile} px, {actors} actor(s), {model}")
    result, _ = run(small, "small")
    small_mp = small_images * tile * tile / 1e6
    out: dict[str, Any] = {
        "model": model,
        "engine": f"{result.engine} {result.precision}",
        "actors": actors,
        "tile": tile,
        "overlap": overlap,
        "small": {
            "images": small_images,
            "mp_per_s": small_mp / result.seconds,
        },
        "scenes": [],
    }
    for side in scene_sizes:
        data = join(root, f"scene-{side}")
        began = time.perf_counter()
        write_scenes(data, num_scenes=1, size=side, seed=side)
        echo(f"scene {side} x {side} px written in {time.perf_counter() - began:.0f} s")
        result, peaks = run(data, f"scene-{side}", tile=tile, overlap=overlap)
        out["scenes"].append(
            {
                "side": side,
                "mp_per_s": side * side / 1e6 / result.seconds,
                "seconds": result.seconds,
            }
            | {f"{name}_mb": value for name, value in peaks.items()}
        )
    return out


def format_bench_tiles(result: dict[str, Any]) -> str:
    """The tiles benchmark's figures as a few aligned lines."""
    small = result["small"]
    lines = [
        f"model {result['model']} ({result['engine']}), {result['actors']} actor(s), "
        f"tile {result['tile']} overlap {result['overlap']}",
        f"small images ({small['images']} of one tile)  {small['mp_per_s']:7.3f} MP/s whole run",
    ]
    for scene in result["scenes"]:
        side = scene["side"]
        lines.append(
            f"scene {side} x {side} ({side * side / 1e6:.0f} MP)  {scene['mp_per_s']:7.3f} MP/s "
            f"({scene['seconds']:.0f} s), scene/small {scene['mp_per_s'] / small['mp_per_s']:.2f}; "
            f"peak RSS driver {scene['driver_mb']:.0f} MB, actor {scene['actor_mb']:.0f} MB, "
            f"any Ray worker {scene['worker_mb']:.0f} MB"
        )
    scenes = result["scenes"]
    if len(scenes) > 1:
        first, last = scenes[0], scenes[-1]
        ratios = ", ".join(
            f"{name} {last[f'{name}_mb'] / first[f'{name}_mb']:.2f}x"
            for name in ("driver", "actor", "worker")
            if first[f"{name}_mb"]
        )
        lines.append(
            f"peak RSS at {last['side'] ** 2 / 1e6:.0f} MP over {first['side'] ** 2 / 1e6:.0f} MP: "
            f"{ratios}"
        )
    return "\n".join(lines)
