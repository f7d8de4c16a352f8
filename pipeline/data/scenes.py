"""Large images for tiled segmentation: their size from the header, windows by ranged reads.

A tiled TIFF (BigTIFF and Cloud-Optimized GeoTIFF included: they are tiled TIFFs) is
read window by window: :class:`WindowReader` opens it through ranged requests
(:class:`RangedFile`, 64 KiB blocks), parses the header with ``tifffile`` and, for a
window, fetches and decodes only the TIFF tiles it touches. Any other image (JPEG, PNG, an
untiled TIFF) cannot be read by window cheaply: it is decoded whole, once, under its own
pixel limit (``max_scene_pixels``), and cut afterwards. :func:`probe` tells which, from the
header alone.

Every failure is a :class:`~pipeline.data.decode.DecodeError` naming the object and the
reason (a truncated tile, a header that claims more pixels than the limit, a pixel layout
the reader does not take); only storage errors propagate.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from pipeline import storage
from pipeline.data.decode import DecodeError, Stage
from pipeline.storage import Location, StorageError

__all__ = [
    "MAX_TILED_PIXELS",
    "RangedFile",
    "SceneInfo",
    "WindowReader",
    "probe",
    "thumbnail",
]

MAX_TILED_PIXELS = 2**36
"""Largest tiled TIFF read by window (64 gigapixels: a 256k x 256k slide); a header that
claims more is refused as absurd."""

_BLOCK = 64 * 2**10
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class RangedFile(io.RawIOBase):
    """A read-only, seekable file over an object, fetched in 64 KiB ranged requests.

    Keeps the last few blocks (headers are read in many small pieces); ``fetched`` counts
    the bytes requested, so a test can show that a window read little of the object.

    Args:
        location: The object.
    """

    def __init__(self, location: Location, cached_blocks: int = 16) -> None:
        super().__init__()
        self.location = location
        self.size = storage.size(location)
        self.position = 0
        self.fetched = 0
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._cached = cached_blocks

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def _block(self, index: int) -> bytes:
        if index in self._blocks:
            self._blocks.move_to_end(index)
            return self._blocks[index]
        start = index * _BLOCK
        data = storage.read_range(self.location, start, min(self.size, start + _BLOCK))
        self.fetched += len(data)
        self._blocks[index] = data
        if len(self._blocks) > self._cached:
            self._blocks.popitem(last=False)
        return data

    def read(self, size: int | None = -1) -> bytes:
        end = self.size if size is None or size < 0 else min(self.size, self.position + size)
        if end <= self.position:
            return b""
        if end - self.position > 2 * _BLOCK:  # a tile: one request, not cached
            data = storage.read_range(self.location, self.position, end)
            self.fetched += len(data)
        else:
            parts = []
            for index in range(self.position // _BLOCK, (end - 1) // _BLOCK + 1):
                block = self._block(index)
                lo = max(self.position - index * _BLOCK, 0)
                parts.append(block[lo : end - index * _BLOCK])
            data = b"".join(parts)
        self.position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@dataclass(frozen=True)
class SceneInfo:
    """What the header says."""

    height: int
    width: int
    windowed: bool
    """A tiled TIFF: read by window. Else decoded whole, then cut."""


def probe(location: Location, stage: Stage = "decode_image") -> SceneInfo:
    """The image's size, and whether it is read by window, from its header (a few KiB).

    Raises:
        DecodeError: Not an image, or a header that cannot be read.
    """
    from PIL import Image

    handle = RangedFile(location)
    head = handle.read(4)
    handle.seek(0)
    if head in _TIFF_MAGIC:
        with _tiff(handle, location, stage) as tiff:
            page = tiff.pages.first
            height, width = int(page.imagelength), int(page.imagewidth)
            return SceneInfo(height, width, windowed=bool(page.is_tiled))
    try:
        with Image.open(cast(Any, handle)) as image:
            width, height = image.size
    except Exception as exc:
        raise DecodeError(
            stage, "NotAnImage", f"{location.uri}: cannot read an image header: {exc}"
        ) from None
    return SceneInfo(height, width, windowed=False)


def _tiff(handle: RangedFile, location: Location, stage: Stage) -> Any:
    import tifffile

    try:
        return tifffile.TiffFile(cast(Any, handle), name=location.uri)
    except StorageError:
        raise
    except Exception as exc:
        raise DecodeError(stage, "BadTiff", f"{location.uri}: not a readable TIFF: {exc}") from None


class WindowReader:
    """Windows of a tiled TIFF, each read with the ranged requests of the tiles it touches.

    Args:
        location: The TIFF.
        stage: The error stage of its failures (``decode_image`` or ``decode_mask``).
        channels: 3 (RGB; gray is repeated, alpha dropped) or 1 (a label mask).
        max_pixels: Largest width * height accepted.
    """

    def __init__(self, location: Location, *, stage: Stage, channels: int, max_pixels: int) -> None:
        self.location = location
        self.stage: Stage = stage
        self.file = RangedFile(location)
        self.tiff = _tiff(self.file, location, stage)
        page = self.tiff.pages.first
        self.page = page
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        self.channels = channels
        where = location.uri
        if self.height < 1 or self.width < 1:
            self._fail("BadHeader", f"{where}: header claims {self.width}x{self.height} pixels")
        if self.height * self.width > max_pixels:
            self._fail(
                "TooManyPixels",
                f"{where}: header claims {self.width}x{self.height} = "
                f"{self.width * self.height} pixels > the limit {max_pixels}",
            )
        if not page.is_tiled:
            self._fail("NotTiled", f"{where}: a TIFF without tiles cannot be read by window")
        if page.dtype is None or page.dtype.itemsize != 1 or int(page.imagedepth) != 1:
            self._fail("UnsupportedTiff", f"{where}: only 8-bit 2-D TIFFs are read by window")
        if int(page.planarconfig) != 1 and int(page.samplesperpixel) > 1:
            self._fail("UnsupportedTiff", f"{where}: planar (separate) samples are not read")
        self.tile_h, self.tile_w = int(page.tilelength), int(page.tilewidth)
        self.tiles_across = -(-self.width // self.tile_w)

    def _fail(self, error_type: str, message: str) -> None:
        self.close()
        raise DecodeError(self.stage, error_type, message)

    def close(self) -> None:
        """Close the TIFF."""
        with contextlib.suppress(Exception):
            self.tiff.close()

    def __enter__(self) -> WindowReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def fetched(self) -> int:
        """Bytes fetched from the object so far."""
        return self.file.fetched

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows ``[y0, y1)`` and columns ``[x0, x1)``: (h, w, 3) uint8, or (h, w) for masks.

        Raises:
            DecodeError: A tile is truncated or does not decode.
        """
        if not (0 <= y0 < y1 <= self.height and 0 <= x0 < x1 <= self.width):
            raise ValueError(f"window {y0}:{y1}, {x0}:{x1} outside {self.height}x{self.width}")
        shape = (y1 - y0, x1 - x0, max(1, int(self.page.samplesperpixel)))
        out = np.zeros(shape, np.uint8)
        page = self.page
        for ty in range(y0 // self.tile_h, (y1 - 1) // self.tile_h + 1):
            for tx in range(x0 // self.tile_w, (x1 - 1) // self.tile_w + 1):
                index = ty * self.tiles_across + tx
                tile = self._tile(page, index)
                top, left = ty * self.tile_h, tx * self.tile_w
                a, b = max(y0, top), min(y1, top + self.tile_h)
                c, d = max(x0, left), min(x1, left + self.tile_w)
                out[a - y0 : b - y0, c - x0 : d - x0] = tile[a - top : b - top, c - left : d - left]
        return self._channels(out)

    def _tile(self, page: Any, index: int) -> np.ndarray:
        where = f"{self.location.uri}: tile {index}"
        try:
            offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        except IndexError:
            raise DecodeError(self.stage, "BadTiff", f"{where} is missing") from None
        if offset + count > self.file.size or count == 0:
            raise DecodeError(
                self.stage, "Truncated", f"{where} lies beyond the object's {self.file.size} bytes"
            )
        self.file.seek(offset)
        data = self.file.read(count)
        try:
            segment, _, _ = page.decode(data, index)
        except Exception as exc:
            raise DecodeError(self.stage, "Truncated", f"{where} does not decode: {exc}") from None
        if segment is None:
            raise DecodeError(self.stage, "Truncated", f"{where} is empty")
        tile = np.asarray(segment).reshape(self.tile_h, self.tile_w, -1)
        return tile

    def _channels(self, pixels: np.ndarray) -> np.ndarray:
        if self.channels == 1:
            return np.ascontiguousarray(pixels[..., 0])
        if pixels.shape[-1] == 1:
            return np.repeat(pixels, 3, axis=-1)
        return np.ascontiguousarray(pixels[..., :3])


def thumbnail(
    location: Location, step: int, *, channels: int, max_pixels: int, stage: Stage = "decode_image"
) -> np.ndarray:
    """Every ``step``-th row and column of an image of any size (as a TIFF label map's
    preview samples it): a tiled TIFF is read a row of tiles at a time, anything else is
    decoded whole (at most ``max_pixels``).

    Args:
        location: The image (or mask: ``channels=1``).
        step: The sampling step.
        channels: 3 (RGB) or 1 (a label mask).
        max_pixels: Largest image decoded whole.

    Raises:
        DecodeError: The image cannot be read.
    """
    from pipeline.data.decode import decode_image, decode_mask

    info = probe(location, stage)
    if not info.windowed:
        data = storage.read_bytes(location)
        if channels == 1:
            whole = decode_mask(data, height=info.height, width=info.width, num_classes=None)
        else:
            whole = decode_image(data, max_pixels=max_pixels)
        return np.ascontiguousarray(whole[::step, ::step])
    out = []
    with WindowReader(
        location, stage=stage, channels=channels, max_pixels=MAX_TILED_PIXELS
    ) as reader:
        for top in range(0, reader.height, reader.tile_h):
            bottom = min(reader.height, top + reader.tile_h)
            taken = np.arange(-top % step, bottom - top, step)
            if taken.size:
                out.append(reader.read(top, bottom, 0, reader.width)[taken, ::step])
    return np.concatenate(out, axis=0)
