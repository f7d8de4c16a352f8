"""The synthetic shapes dataset (:mod:`fcn.synthetic`) written to any URI in VOC layout."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from pipeline.data.layouts import DatasetInfo
from pipeline.storage import (
    Location,
    StorageOptions,
    resolve,
    write_bytes,
)

__all__ = ["write_synthetic"]


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
