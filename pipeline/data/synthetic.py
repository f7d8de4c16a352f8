"""The synthetic shapes dataset (:mod:`fcn.synthetic`) written to any URI in VOC layout."""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from pipeline.data.layouts import DatasetInfo
from pipeline.storage import (
    Location,
    StorageOptions,
    resolve,
    upload,
    write_bytes,
)

__all__ = ["SCENE_BLOCK", "write_scenes", "write_synthetic"]


def write_synthetic(
    uri: str | Location,
    *,
    num_images: int,
    size: int | tuple[int, int] = 128,
    seed: int = 0,
    val_fraction: float = 0.2,
    options: StorageOptions | None = None,
    max_workers: int = 8,
) -> DatasetInfo:
    """Write the synthetic shapes dataset (:mod:`fcn.synthetic`) in VOC layout.

    JPEG images (quality 95, 4:4:4 chroma), palette PNG masks, ``classes.txt`` and, last,
    ``ImageSets/Segmentation/{train,val}.txt``. Same arguments, same bytes; objects of an
    earlier, larger dataset at the same root are left in place.

    Args:
        uri: Dataset root.
        num_images: Number of images.
        size: Image size, int or (height, width).
        seed: Dataset seed.
        val_fraction: Fraction of images in ``val``.
        options: Storage options.
        max_workers: Threads generating and writing samples (object-store latency).
    """
    # Imported here: decode tasks unpickle this module and need neither (nor torch).
    from fcn.palette import encode_label_png
    from fcn.synthetic import CLASS_NAMES, make_dataset

    data = make_dataset(num_images, size=size, seed=seed, val_fraction=val_fraction)
    root = resolve(uri, options)

    def write_one(index: int) -> None:
        sample = data[index]
        buf = io.BytesIO()
        # 4:4:4 chroma: thin strokes are told apart by colour.
        Image.fromarray(sample.image).save(buf, format="JPEG", quality=95, subsampling=0)
        write_bytes(root.join("JPEGImages", f"{sample.image_id}.jpg"), buf.getvalue())
        mask_png = encode_label_png(sample.mask, palette=True)
        write_bytes(root.join("SegmentationClass", f"{sample.image_id}.png"), mask_png)

    with ThreadPoolExecutor(max(1, max_workers)) as pool:
        list(pool.map(write_one, range(num_images)))
    write_bytes(root.join("classes.txt"), "".join(f"{n}\n" for n in CLASS_NAMES).encode())
    splits: dict[str, int] = {}
    for split in ("train", "val"):
        ids = data.ids(split)
        splits[split] = len(ids)
        text = "".join(f"{i}\n" for i in ids)
        write_bytes(root.join("ImageSets", "Segmentation", f"{split}.txt"), text.encode())
    return DatasetInfo(
        uri=root.uri,
        layout="voc",
        num_images=num_images,
        num_with_masks=num_images,
        num_missing=0,
        splits=splits,
        class_names=CLASS_NAMES,
    )


SCENE_BLOCK = 128
"""Side of the samples a scene is tiled with (the demo's image size: a demo model segments
scenes as it does its images)."""
_SCENE_TIFF_TILE = 256


def write_scenes(
    uri: str | Location,
    *,
    num_scenes: int,
    size: int | tuple[int, int],
    seed: int = 0,
    options: StorageOptions | None = None,
) -> DatasetInfo:
    """Write large synthetic scenes: shapes scattered over a big textured canvas.

    Each scene is a mosaic of :data:`SCENE_BLOCK`-pixel synthetic samples
    (:func:`fcn.synthetic.make_sample`), written as a tiled (256 x 256), zlib-compressed RGB
    TIFF ``images/scene_NNN.tif`` with its mask as a tiled single-channel TIFF
    ``masks/scene_NNN.tif`` (class ids, 255 on the ignore borders), plus ``classes.txt``:
    the ``generic`` layout. Generated and written tile by tile: memory stays at a few
    tiles whatever the scene's size (a 20000 x 20000 scene takes about a minute).

    Args:
        uri: Dataset root.
        num_scenes: Number of scenes.
        size: Side, or (height, width), of each scene.
        seed: Dataset seed.
        options: Storage options.
    """
    import tempfile
    from pathlib import Path

    import tifffile

    from fcn.synthetic import CLASS_NAMES, make_sample

    height, width = (size, size) if isinstance(size, int) else size
    root = resolve(uri, options)
    tile, block = _SCENE_TIFF_TILE, SCENE_BLOCK
    per_row = -(-width // block)
    per_tile = tile // block

    def tiles(scene: int, kind: int) -> Iterator[np.ndarray]:
        for ty in range(0, height, tile):
            for tx in range(0, width, tile):
                out = np.zeros((tile, tile, 3) if kind == 0 else (tile, tile), np.uint8)
                for by in range(per_tile):
                    for bx in range(per_tile):
                        row, col = (ty // block) + by, (tx // block) + bx
                        index = (scene * -(-height // block) + row) * per_row + col
                        image, mask = make_sample(index, size=block, seed=seed)
                        out[by * block : (by + 1) * block, bx * block : (bx + 1) * block] = (
                            image if kind == 0 else mask
                        )
                yield out

    with tempfile.TemporaryDirectory(prefix="fcnpipe-scene-") as tmp:
        for scene in range(num_scenes):
            name = f"scene_{scene:03d}"
            for kind, folder in ((0, "images"), (1, "masks")):
                path = Path(tmp) / f"{name}.tif"
                tifffile.imwrite(
                    path,
                    tiles(scene, kind),
                    shape=(height, width, 3) if kind == 0 else (height, width),
                    dtype=np.uint8,
                    tile=(tile, tile),
                    compression="zlib",
                    photometric="rgb" if kind == 0 else "minisblack",
                    bigtiff=height * width * 3 > 2**31,
                )
                upload(path, root.join(folder, f"{name}.tif"))
                path.unlink()
    write_bytes(root.join("classes.txt"), "".join(f"{n}\n" for n in CLASS_NAMES).encode())
    return DatasetInfo(
        uri=root.uri,
        layout="generic",
        num_images=num_scenes,
        num_with_masks=num_scenes,
        num_missing=0,
        splits={},
        class_names=CLASS_NAMES,
    )
