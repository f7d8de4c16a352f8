"""Tiled segmentation: huge images cut into strips of overlapping windows, blended, stitched.

With ``tile`` set, an image larger than a tile (per :func:`fcn.tiling.axis_windows`) is
segmented in three steps, none of which holds the whole image's scores:

1. **Cut** (a Ray Data read task, :func:`cut_rows`): the header gives the size; a tiled
   TIFF is read strip by strip through ranged requests (:mod:`pipeline.data.scenes`), any
   other image is decoded whole once (under ``max_scene_pixels``) and cut. A *strip* is one
   row of windows: ``tile`` rows (a bit more or less at the bottom) by the full width.
   Each strip is a row (and, being large, a block) of its own: the unit of parallel work
   that Ray Data hands to any actor on any node.
2. **Segment a strip** (in an actor, :func:`segment_strip`): its windows run left to
   right; each window's scores are weighted by its ramps (:func:`fcn.tiling.ramp`) and
   added to the carry of its left neighbour, so every column is final once the next window
   has passed. The strip's own rows (those no other strip covers) become labels there; its
   top and bottom bands, shared with the strips above and below, stay weighted scores
   (float16). Both go to a staging area under the output root, one part per window:
   ``OUT/label_maps/run_id=<run>/_parts/<image_id>/<strip>-<window>.npz``. The strip's
   class counts (and confusion counts with the mask) come back in its row.
3. **Assemble** (a Ray task per image, :func:`assemble`, once every strip is back): strip by
   strip, each band shared by two strips is the arg-max of their two partial sums, and the
   rows go, in order, into the label map: a tiled, zlib-compressed, single-channel TIFF at
   ``OUT/label_maps/run_id=<run>/<image_id>.tif`` (its URI in ``predictions.label_map_uri``,
   a preview PNG of at most 1024 px a side in ``label_map``), or, up to
   ``inline_max_pixels`` (16 MP by default), a PNG in ``label_map`` as for any image. The
   staging parts are deleted after.

The driver writes the image's ``predictions`` row only after the assembly wrote the label
map: a run killed mid-image leaves no row, the rerun segments the image again and
overwrites its parts, and no committed row ever points at a partial label map.
"""

from __future__ import annotations

import io
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa

from fcn.tiling import Window, axis_windows, ramp
from pipeline import storage
from pipeline.data.decode import DecodeError, decode_image
from pipeline.data.layouts import MANIFEST_SCHEMA
from pipeline.data.reading import DECODED_SCHEMA, DatasetConfig, load_batch
from pipeline.data.scenes import MAX_TILED_PIXELS, WindowReader, probe
from pipeline.storage import Location, StorageError, StorageOptions

__all__ = [
    "PREVIEW_SIDE",
    "TILED_SCHEMA",
    "Tiling",
    "assemble",
    "cut_rows",
    "label_map_dir",
    "segment_strip",
]

PREVIEW_SIDE = 1024
"""Longer side of the preview PNG of a TIFF label map."""
_TIFF_TILE = 256

TILED_SCHEMA = pa.schema(
    [
        *DECODED_SCHEMA,
        pa.field("strip", pa.int32()),
        pa.field("strips", pa.int32()),
    ]
)
"""Decoded rows of a tiled run: a whole image (``strip`` null) or one strip of a large
one (``height``/``width`` are the image's, ``image``/``mask`` the strip's rows)."""


@dataclass(frozen=True, kw_only=True)
class Tiling:
    """How large images are cut (``SegmentData.tile``, ``overlap``)."""

    tile: int
    overlap: int

    def rows(self, height: int) -> list[Window]:
        """The strips (windows along the rows) of an image ``height`` rows tall."""
        return axis_windows(height, self.tile, self.overlap)

    def columns(self, width: int) -> list[Window]:
        """The windows along a strip."""
        return axis_windows(width, self.tile, self.overlap)

    def fits(self, height: int, width: int) -> bool:
        """Whether the image runs whole (one window each way)."""
        return len(self.rows(height)) == 1 and len(self.columns(width)) == 1


def label_map_dir(output: Location, run_id: str) -> Location:
    """Where a run's TIFF label maps (and their staging parts) go."""
    return output.join("label_maps", f"run_id={run_id}")


# --------------------------------------------------------------------------------------
# 1. Cut


def cut_rows(
    batch: pa.Table,
    *,
    config: DatasetConfig,
    tiling: Tiling,
    num_classes: int | None,
) -> Iterator[pa.Table]:
    """Manifest rows in, :data:`TILED_SCHEMA` rows out: whole images decoded as
    :func:`~pipeline.data.reading.load_batch` does, large ones as one row per strip.

    A generator (a Ray Data ``map_batches`` step): each strip is yielded on its own, so a
    task holds one strip of a tiled TIFF at a time (a whole-decoded image is held once).
    """
    rows = batch.select(list(MANIFEST_SCHEMA.names)).to_pylist()
    small: list[dict[str, Any]] = []
    for row in rows:
        try:
            info = probe(storage.resolve(row["image_uri"], config.storage))
        except StorageError:
            raise
        except Exception:
            small.append(row)  # load_batch makes the error row, as for any image
            continue
        if tiling.fits(info.height, info.width):
            small.append(row)
            continue
        try:
            yield from _strips(row, info.windowed, config, tiling, num_classes)
        except DecodeError as exc:
            yield _error_row(row, exc.stage, exc.error_type, exc.message)
        except StorageError:
            raise
        except FileNotFoundError as exc:
            yield _error_row(row, "read", "FileNotFoundError", f"{row['image_uri']}: {exc}")
        except Exception as exc:  # a reader bug must not take the other images with it
            yield _error_row(row, "decode_image", type(exc).__name__, f"{row['image_uri']}: {exc}")
    if small:
        decoded = load_batch(
            pa.Table.from_pylist(small, schema=MANIFEST_SCHEMA),
            config=config,
            num_classes=num_classes,
        )
        yield _with_strips(decoded, None, None)


def _with_strips(decoded: pa.Table, strip: int | None, strips: int | None) -> pa.Table:
    n = decoded.num_rows
    return decoded.append_column("strip", pa.array([strip] * n, pa.int32())).append_column(
        "strips", pa.array([strips] * n, pa.int32())
    )


def _error_row(row: dict[str, Any], stage: str, error_type: str, message: str) -> pa.Table:
    out: dict[str, list[Any]] = {name: [None] for name in DECODED_SCHEMA.names}
    for name in MANIFEST_SCHEMA.names:
        out[name] = [row[name]]
    out["error_stage"], out["error_type"], out["error_message"] = [stage], [error_type], [message]
    return _with_strips(pa.table(out, schema=DECODED_SCHEMA), None, None)


def _strips(
    row: dict[str, Any],
    windowed: bool,
    config: DatasetConfig,
    tiling: Tiling,
    num_classes: int | None,
) -> Iterator[pa.Table]:
    """One row per strip of a large image (and its mask, if any)."""
    image_loc = storage.resolve(row["image_uri"], config.storage)
    image: WindowReader | np.ndarray
    if windowed:
        image = WindowReader(
            image_loc, stage="decode_image", channels=3, max_pixels=MAX_TILED_PIXELS
        )
        height, width = image.height, image.width
    else:
        data = storage.read_bytes(image_loc, max_bytes=config.max_bytes)
        try:
            image = decode_image(data, max_pixels=config.max_scene_pixels, formats=config.formats)
        except DecodeError as exc:
            raise DecodeError(
                exc.stage,
                exc.error_type,
                f"{row['image_uri']}: {exc.message} (an untiled image is decoded whole, up to "
                "max_scene_pixels; a tiled TIFF is read by window, any size)",
            ) from None
        height, width = image.shape[:2]
    mask = _mask(row["mask_uri"], height, width, config, num_classes)
    strips = tiling.rows(height)
    try:
        for index, strip in enumerate(strips):
            pixels = _rows(image, strip, width)
            labels = None if mask is None else _rows(mask, strip, width)
            _check_labels(labels, num_classes, row["mask_uri"])
            out = {name: [row[name]] for name in MANIFEST_SCHEMA.names}
            out.update(
                height=[height],
                width=[width],
                image=[pixels.tobytes()],
                mask=[None if labels is None else labels.tobytes()],
                bytes_read=[None],
                error_stage=[None],
                error_type=[None],
                error_message=[None],
            )
            yield _with_strips(pa.table(out, schema=DECODED_SCHEMA), index, len(strips))
    finally:
        for reader in (image, mask):
            if isinstance(reader, WindowReader):
                reader.close()


def _rows(source: WindowReader | np.ndarray, strip: Window, width: int) -> np.ndarray:
    if isinstance(source, WindowReader):
        return source.read(strip.start, strip.stop, 0, width)
    return np.ascontiguousarray(source[strip.start : strip.stop])


def _mask(
    uri: str | None, height: int, width: int, config: DatasetConfig, num_classes: int | None
) -> WindowReader | np.ndarray | None:
    """The mask of a large image: read by window if it is a tiled TIFF, else decoded whole."""
    from pipeline.data.decode import decode_mask
    from pipeline.data.scenes import probe as probe_mask

    if uri is None:
        return None
    loc = storage.resolve(uri, config.storage)
    info = probe_mask(loc, stage="decode_mask")
    if (info.height, info.width) != (height, width):
        raise DecodeError(
            "decode_mask",
            "SizeMismatch",
            f"{uri}: mask is {info.width}x{info.height}, its image {width}x{height}",
        )
    if info.windowed:
        return WindowReader(loc, stage="decode_mask", channels=1, max_pixels=MAX_TILED_PIXELS)
    if height * width > config.max_scene_pixels:
        raise DecodeError(
            "decode_mask",
            "TooManyPixels",
            f"{uri}: {width}x{height} pixels > max_scene_pixels {config.max_scene_pixels}",
        )
    data = storage.read_bytes(loc, max_bytes=config.max_bytes)
    return decode_mask(data, height=height, width=width, num_classes=num_classes)


def _check_labels(labels: np.ndarray | None, num_classes: int | None, uri: str | None) -> None:
    if labels is None or num_classes is None:
        return
    bad = (labels >= num_classes) & (labels != 255)
    if bad.any():
        value = int(labels[bad][0])
        raise DecodeError(
            "decode_mask", "BadLabel", f"{uri}: mask value {value} >= num_classes {num_classes}"
        )


# --------------------------------------------------------------------------------------
# 2. Segment a strip


COUNT_NAMES = ("class_pixel_counts", "gt_pixels", "pred_pixels", "intersection", "union")


def _counts(labels: np.ndarray, mask: np.ndarray | None, n: int) -> dict[str, np.ndarray]:
    """Class pixel counts of ``labels``, and the confusion counts with ``mask`` if any."""
    from fcn.metrics import confusion_matrix, per_class_counts

    out = {"class_pixel_counts": np.bincount(labels.ravel(), minlength=n)[:n].astype(np.int64)}
    if mask is not None:
        counts = per_class_counts(confusion_matrix(labels, mask, n))
        out.update({name: np.asarray(counts[name], np.int64) for name in COUNT_NAMES[1:]})
    return out


def _add(total: dict[str, np.ndarray], part: dict[str, np.ndarray]) -> None:
    for name, value in part.items():
        total[name] = total[name] + value if name in total else value.copy()


def segment_strip(
    scores: Callable[[np.ndarray], np.ndarray],
    *,
    image_id: str,
    pixels: np.ndarray,
    mask: np.ndarray | None,
    height: int,
    width: int,
    strip: int,
    tiling: Tiling,
    num_classes: int,
    parts: Location,
) -> dict[str, np.ndarray]:
    """Segment one strip window by window, write its parts, return its class counts.

    Args:
        scores: The engine's scores of one uint8 image (1, 3, h, w) -> (1, C, h, w).
        image_id: The image.
        pixels: The strip's rows, (h, width, 3) uint8.
        mask: The strip's mask rows (h, width) or None.
        height: The image's height.
        width: Its width.
        strip: Which strip.
        tiling: Tile and overlap.
        num_classes: Classes of the model.
        parts: The run's staging directory (``<label maps>/_parts``).
    """
    rows = tiling.rows(height)[strip]
    weights_y = ramp(rows)
    top, bottom = rows.lead, rows.trail
    core = slice(top, rows.length - bottom)
    totals: dict[str, np.ndarray] = {}
    carry: np.ndarray | None = None
    for index, cols in enumerate(tiling.columns(width)):
        window = np.ascontiguousarray(pixels[:, cols.start : cols.stop].transpose(2, 0, 1)[None])
        weighted = np.asarray(scores(window)[0], np.float32)
        weighted *= weights_y[None, :, None]
        weighted *= ramp(cols)[None, None, :]
        if carry is not None:
            weighted[:, :, : cols.lead] += carry
        done = cols.length - cols.trail  # columns no later window touches
        carry = weighted[:, :, done:].copy() if cols.trail else None
        final = weighted[:, :, :done]
        labels = final[:, core].argmax(0).astype(np.uint8)
        span = slice(cols.start, cols.start + done)
        labelled = None if mask is None else mask[core, span]
        _add(totals, _counts(labels, labelled, num_classes))
        part: dict[str, np.ndarray] = {"labels": labels}
        if top:
            part["top"] = final[:, :top].astype(np.float16)
        if bottom:
            part["bottom"] = final[:, rows.length - bottom :].astype(np.float16)
            if mask is not None:
                part["bottom_mask"] = np.ascontiguousarray(mask[rows.length - bottom :, span])
        buffer = io.BytesIO()
        cast(Any, np.savez)(buffer, **part)
        storage.write_bytes(parts.join(image_id, f"{strip}-{index}.npz"), buffer.getvalue())
    return totals


# --------------------------------------------------------------------------------------
# 3. Assemble


def assemble(
    *,
    image_id: str,
    height: int,
    width: int,
    tiling: Tiling,
    num_classes: int,
    out_dir: Location,
    palette: bool,
    inline_max_pixels: int,
) -> dict[str, Any]:
    """Stitch an image's parts into its label map; the counts of the shared bands.

    Returns:
        ``label_map`` (PNG bytes: the map, or a preview of the TIFF), ``label_map_uri``
        (None for an inline map), and the bands' counts (:data:`COUNT_NAMES`).
    """
    from fcn.palette import encode_label_png

    began = time.perf_counter()
    parts = out_dir.join("_parts", image_id)
    strips = tiling.rows(height)
    columns = tiling.columns(width)
    totals: dict[str, np.ndarray] = {}

    def part(strip: int, index: int) -> dict[str, np.ndarray]:
        data = storage.read_bytes(parts.join(f"{strip}-{index}.npz"))
        with np.load(io.BytesIO(data)) as npz:
            return {name: npz[name] for name in npz.files}

    def bands() -> Iterator[np.ndarray]:
        """The label map's rows, top to bottom, a band at a time."""
        below: list[dict[str, np.ndarray]] = []
        for k in range(len(strips)):
            current = [part(k, j) for j in range(len(columns))]
            if k:  # the band shared with the strip above
                band = []
                for upper, lower in zip(below, current, strict=True):
                    blend = upper["bottom"].astype(np.float32) + lower["top"].astype(np.float32)
                    labels = blend.argmax(0).astype(np.uint8)
                    _add(totals, _counts(labels, upper.get("bottom_mask"), num_classes))
                    band.append(labels)
                yield np.concatenate(band, axis=1)
            yield np.concatenate([p["labels"] for p in current], axis=1)
            below = [{k2: v for k2, v in p.items() if k2 != "labels"} for p in current]

    uri = None
    if height * width <= inline_max_pixels:
        label_map = np.concatenate(list(bands()), axis=0)
        png = encode_label_png(label_map, palette=palette)
    else:
        step = max(1, -(-max(height, width) // PREVIEW_SIDE))
        preview: list[np.ndarray] = []
        target = out_dir.join(f"{image_id}.tif")
        with tempfile.TemporaryDirectory(prefix="fcnpipe-tiff-") as tmp:
            path = Path(tmp) / "labels.tif"
            _write_tiff(path, bands(), height, width, preview, step)
            storage.write_bytes(target, path.read_bytes())
        png = encode_label_png(np.concatenate(preview, axis=0), palette=palette)
        uri = target.uri
    storage.delete(parts)
    return {
        "label_map": png,
        "label_map_uri": uri,
        "counts": {name: value.tolist() for name, value in totals.items()},
        "seconds": time.perf_counter() - began,
    }


def _write_tiff(
    path: Path,
    bands: Iterator[np.ndarray],
    height: int,
    width: int,
    preview: list[np.ndarray],
    step: int,
) -> None:
    """The bands into a tiled, zlib-compressed uint8 TIFF; every ``step``-th row and column
    into ``preview``."""
    import tifffile

    def tiles() -> Iterator[np.ndarray]:
        pending = np.empty((0, width), np.uint8)
        row = 0
        for band in bands:
            taken = np.arange(-row % step, band.shape[0], step)
            if taken.size:
                preview.append(band[taken, ::step])
            row += band.shape[0]
            pending = np.concatenate([pending, band], axis=0)
            while pending.shape[0] >= _TIFF_TILE or (row == height and pending.shape[0]):
                chunk = pending[:_TIFF_TILE]
                pending = pending[_TIFF_TILE:]
                if chunk.shape[0] < _TIFF_TILE:
                    chunk = np.pad(chunk, ((0, _TIFF_TILE - chunk.shape[0]), (0, 0)))
                for x in range(0, width, _TIFF_TILE):
                    tile = chunk[:, x : x + _TIFF_TILE]
                    if tile.shape[1] < _TIFF_TILE:
                        tile = np.pad(tile, ((0, 0), (0, _TIFF_TILE - tile.shape[1])))
                    yield tile

    tifffile.imwrite(
        path,
        tiles(),
        shape=(height, width),
        dtype=np.uint8,
        tile=(_TIFF_TILE, _TIFF_TILE),
        compression="zlib",
        photometric="minisblack",
    )


def staging(output_uri: str, run_id: str, options: StorageOptions) -> Location:
    """The run's label-map directory (its ``_parts`` hold the staging parts)."""
    return label_map_dir(storage.resolve(output_uri, options), run_id)
