"""Incremental segmentation: a full run of a bucket vs a run after a few objects were added.

Usage:
    fcnpipe bench incremental [--num-objects 2000 --added 20 --size 64 --local]

Writes ``num_objects`` images to a bucket (by default on a SeaweedFS server the command starts
on 127.0.0.1), segments them as stream ``bench`` (the full run), adds ``added`` images and
runs the stream again (the incremental run: it lists the whole bucket, reads what the
stream's runs recorded, and decodes and segments only the new ones), then once more with
nothing new (what is left is the part proportional to the bucket, without any actor). Ray is
started before the first run, so no run pays its start-up. Also times the listing alone,
per 1,000 keys.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.bench.segment import _random_model
from pipeline.bench.tables import cpu_model
from pipeline.config import make
from pipeline.segment.config import SegmentConfig
from pipeline.segment.driver import SegmentResult, segment
from pipeline.storage import join, list_files, resolve, write_bytes

__all__ = ["bench_incremental", "format_bench_incremental"]


def bench_incremental(
    *,
    num_objects: int = 2000,
    added: int = 20,
    size: int = 64,
    model: str = "fcn8s_resnet18",
    root: str,
    num_cpus: int | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time a stream's full run, then its run after ``added`` new objects.

    Args:
        num_objects: Images in the bucket for the full run.
        added: Images added before the incremental run.
        size: Their side in pixels.
        model: The model (random weights) that segments them.
        root: Scratch URI (the bucket, the model and the tables go under it).
        num_cpus: CPUs of the embedded Ray, if this call starts one.
        echo: Where progress lines go.
    """
    from pipeline.cluster import ensure_ray

    camera, out = join(root, "camera"), join(root, "out")
    echo(f"writing {num_objects} images of {size} px to {camera}")
    _put_images(camera, range(num_objects), size)
    model_uri = _random_model(join(root, "models", "bench"), model)
    ensure_ray(num_cpus=num_cpus)

    def run(run_id: str) -> SegmentResult:
        config = make(
            SegmentConfig,
            input_uri=camera,
            model_uri=model_uri,
            output_uri=out,
            run_id=run_id,
            stream="bench",
            backend="torch",
        )
        return segment(config, echo=echo)

    full = run("full")
    _put_images(camera, range(num_objects, num_objects + added), size)
    incremental = run("incremental")
    unchanged = run("unchanged")  # nothing new: the part proportional to the bucket alone
    listings = []
    for _ in range(3):
        began = time.perf_counter()
        keys = len(list_files(camera))
        listings.append(time.perf_counter() - began)
    per_1000 = min(listings) / keys * 1000
    return {
        "num_objects": num_objects,
        "added": added,
        "size": size,
        "model": model,
        "source": root.split("://")[0] if "://" in root else "file",
        "full_s": full.seconds,
        "full_images": full.num_images,
        "incremental_s": incremental.seconds,
        "incremental_images": incremental.num_images,
        "unchanged": incremental.unchanged,
        "ratio": incremental.seconds / full.seconds,
        "unchanged_s": unchanged.seconds,
        "listing_s_per_1000": per_1000,
        "listing_10m_s": per_1000 * 10_000,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
    }


def format_bench_incremental(result: dict[str, Any]) -> str:
    """The figures as a few lines."""
    r = result
    return "\n".join(
        [
            f"CPU: {r['cpu']} ({r['cores']} cores); {r['num_objects']} + {r['added']} images of "
            f"{r['size']} px on {r['source']}, {r['model']}",
            f"full run         {r['full_s']:8.1f} s  ({r['full_images']} segmented)",
            f"incremental run  {r['incremental_s']:8.1f} s  ({r['incremental_images']} segmented, "
            f"{r['unchanged']} unchanged)",
            f"nothing new      {r['unchanged_s']:8.1f} s  (list, diff, record the listing, commit)",
            f"incremental / full: {r['ratio']:.3f}",
            f"listing: {r['listing_s_per_1000'] * 1000:.1f} ms per 1,000 keys "
            f"(10 M keys: about {r['listing_10m_s'] / 60:.0f} min, sequential)",
        ]
    )


def _put_images(prefix: str, indices: range, size: int) -> None:
    """Random PNGs ``prefix/img_<i>.png``, written by a few threads."""
    from PIL import Image

    loc = resolve(prefix)  # one filesystem, its connections reused by every put

    def put(i: int) -> None:
        pixels = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        write_bytes(loc.join(f"img_{i:07d}.png"), buf.getvalue())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, indices))
