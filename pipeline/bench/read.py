"""``fcnpipe bench read``: read + decode throughput of the same images from local disk and S3.

Usage:
    fcnpipe bench read [--num-images 200 --size 256]
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    import ray.data

from pipeline.data.layouts import DatasetError, load_manifest
from pipeline.data.reading import DatasetConfig, read_decoded

__all__ = ["bench_read", "format_bench"]


def bench_read(
    local_uri: str,
    s3_uri: str,
    *,
    num_images: int = 200,
    config: DatasetConfig | None = None,
    warmup: bool = True,
) -> dict[str, Any]:
    """Read and decode the same images from local disk and from S3, and time both.

    Each side is one :func:`read_decoded` pass over the first ``num_images`` ids (sorted)
    that both roots hold, consumed on the driver. With ``warmup``, an untimed pass over each
    side first starts Ray's workers, their storage clients and any caches, so the figures
    are steady-state throughput. Prints nothing.

    Args:
        local_uri: A local dataset root or manifest.
        s3_uri: The same dataset on an object store (root or manifest).
        num_images: Images to read from each.
        config: Reading options (layout, split, limits, storage).
        warmup: Run an untimed pass over each side first.

    Returns:
        ``{"num_images", "local": {...}, "s3": {...}, "s3_over_local"}``; each side has
        ``seconds``, ``images``, ``errors``, ``bytes``, ``images_per_s``, ``mb_per_s``
        (encoded bytes read, images and masks, 10**6 bytes) and ``megapixels_per_s``.
        ``s3_over_local`` is the ratio of their images/s.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    cfg = config or DatasetConfig()
    tables = {
        name: load_manifest(uri, layout=cfg.layout, options=cfg.storage)
        for name, uri in (("local", local_uri), ("s3", s3_uri))
    }
    common = set(tables["local"]["image_id"].to_pylist()) & set(
        tables["s3"]["image_id"].to_pylist()
    )
    ids = sorted(common)[:num_images]
    if not ids:
        raise DatasetError(f"{local_uri} and {s3_uri} have no image ids in common")
    picked = {n: t.filter(pc.is_in(t["image_id"], pa.array(ids))) for n, t in tables.items()}
    if warmup:
        for table in picked.values():
            _consume(read_decoded(table, config=cfg))
    result: dict[str, Any] = {"num_images": len(ids)}
    for name, table in picked.items():
        started = time.perf_counter()
        counts = _consume(read_decoded(table, config=cfg))
        seconds = max(time.perf_counter() - started, 1e-9)
        result[name] = {
            "seconds": seconds,
            **counts,
            "images_per_s": counts["images"] / seconds,
            "mb_per_s": counts["bytes"] / 1e6 / seconds,
            "megapixels_per_s": counts["pixels"] / 1e6 / seconds,
        }
    local_rate = result["local"]["images_per_s"]
    result["s3_over_local"] = result["s3"]["images_per_s"] / local_rate if local_rate else None
    return result


def format_bench(result: Mapping[str, Any]) -> str:
    """A plain-text table of :func:`bench_read` figures.

    Args:
        result: What :func:`bench_read` returned.
    """
    lines = [
        f"read + decode, {result['num_images']} images",
        f"{'source':<8}{'seconds':>10}{'images/s':>12}{'MB/s':>10}{'MP/s':>10}{'errors':>8}",
    ]
    for name in ("local", "s3"):
        r = result[name]
        lines.append(
            f"{name:<8}{r['seconds']:>10.2f}{r['images_per_s']:>12.1f}{r['mb_per_s']:>10.2f}"
            f"{r['megapixels_per_s']:>10.2f}{r['errors']:>8d}"
        )
    ratio = result.get("s3_over_local")
    lines.append("s3 / local images/s: " + ("n/a" if ratio is None else f"{ratio:.2f}"))
    return "\n".join(lines)


def _consume(decoded: ray.data.Dataset) -> dict[str, int]:
    counts = {"images": 0, "errors": 0, "bytes": 0, "pixels": 0}
    for data in decoded.iter_batches(batch_size=None, batch_format="pyarrow"):
        batch = pa.table(data)
        good = pc.is_null(batch["error_stage"])
        counts["images"] += pc.sum(good.cast(pa.int64())).as_py() or 0
        counts["errors"] += batch.num_rows - (pc.sum(good.cast(pa.int64())).as_py() or 0)
        counts["bytes"] += pc.sum(batch["bytes_read"]).as_py() or 0
        area = pc.multiply(batch["height"].cast(pa.int64()), batch["width"].cast(pa.int64()))
        counts["pixels"] += pc.sum(area).as_py() or 0
    return counts
