"""Bounded image and mask decoding: bytes in, arrays out, or a :class:`DecodeError`.

Object stores hold whatever someone uploaded. Before any pixel is decoded, the header's
size is checked against a pixel budget (Pillow's ``Image.open`` is lazy: it reads the header
and nothing else), only the allowed formats are parsed at all, and truncated data fails
instead of yielding half-grey images (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left off).
Every failure becomes a :class:`DecodeError` naming the stage, a short error type and the
reason, which the dataset readers turn into error rows.

EXIF orientation is not applied: masks carry no EXIF, and the stored pixel grid is what
their pixels line up with (as in ``torchvision.io.decode_image``'s default).

Example::

    image = decode_image(data)  # uint8 (H, W, 3) RGB
    mask = decode_mask(mask_data, height=image.shape[0], width=image.shape[1], num_classes=21)
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
from PIL import Image

from fcn import IGNORE_INDEX

__all__ = [
    "DEFAULT_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "IGNORE_INDEX",
    "DecodeError",
    "Stage",
    "check_formats",
    "check_max_pixels",
    "decode_image",
    "decode_mask",
]

Stage = Literal["read", "decode_image", "decode_mask"]
"""Where a sample failed: reading the object, decoding the image, or decoding its mask."""

DEFAULT_MAX_PIXELS = 50_000_000
"""Default pixel budget per image (50 MP: about 150 MB decoded as RGB), well below Pillow's
decompression-bomb limit (about 89 MP warns, 179 MP raises)."""

DEFAULT_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
"""Image formats parsed by default (Pillow format names); nothing else is even opened."""


# Pillow reports some JPEG files (with a multi-picture extension) as "MPO".
_FORMAT_ALIASES = {"MPO": "JPEG"}

# 16-bit and 32-bit grayscale modes: scaled to 8 bits, not clipped.
_WIDE_GRAY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class DecodeError(Exception):
    """A sample that cannot be used: where it failed, a short error type, and why.

    Args:
        stage: ``"read"``, ``"decode_image"`` or ``"decode_mask"``.
        error_type: A short name for the failure, e.g. ``"TooManyPixels"``, ``"Truncated"``.
        message: What was wrong, in words (names the object where known).
    """

    def __init__(self, stage: Stage, error_type: str, message: str) -> None:
        super().__init__(f"{stage}: {error_type}: {message}")
        self.stage: Stage = stage
        self.error_type = error_type
        self.message = message

    def __reduce__(self) -> tuple[type[DecodeError], tuple[Stage, str, str]]:
        return (type(self), (self.stage, self.error_type, self.message))


def check_max_pixels(max_pixels: int) -> int:
    """Validate a pixel budget: at least 1 and within Pillow's hard decompression-bomb limit.

    Args:
        max_pixels: The budget to check.

    Raises:
        ValueError: Out of range (the message gives the range).
    """
    hard_limit = _pillow_hard_limit()
    if max_pixels < 1 or (hard_limit is not None and max_pixels > hard_limit):
        raise ValueError(
            f"max_pixels must be in [1, {hard_limit}] (Pillow rejects larger images as "
            f"decompression bombs), got {max_pixels}"
        )
    return max_pixels


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """Validate image format names (Pillow's, e.g. ``"PNG"``) and return them upper-cased.

    Args:
        formats: Format names.

    Raises:
        ValueError: Empty, or a name Pillow cannot open.
    """
    Image.init()
    names = tuple(f.upper() for f in formats)
    unknown = [f for f in names if f not in Image.OPEN]
    if not names or unknown:
        raise ValueError(
            f"formats must be a non-empty list of Pillow format names, e.g. {DEFAULT_FORMATS}; "
            f"unknown: {unknown}"
        )
    return names


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: Sequence[str] = DEFAULT_FORMATS,
) -> np.ndarray:
    """Decode an image to uint8 (H, W, 3) RGB within a pixel budget.

    Palette, grayscale, LA/RGBA, CMYK and 16-bit grayscale images are converted to RGB
    (alpha is dropped; 16-bit values are scaled to 8 bits). Animated images give their first
    frame.

    Args:
        data: The encoded image.
        max_pixels: Largest width * height accepted, checked on the header before decoding.
        formats: Pillow format names allowed; other formats are never parsed.

    Raises:
        DecodeError: Stage ``"decode_image"``: empty data, not an image in an allowed format,
            too many pixels, truncated or corrupt data, or an unsupported pixel mode.
    """
    stage: Stage = "decode_image"
    allowed = tuple(f.upper() for f in formats)
    img = _open(data, stage, allowed, max_pixels)
    with img:
        width, height = img.size
        pixels = width * height
        if width < 1 or height < 1:
            raise DecodeError(stage, "BadHeader", f"image header claims {width}x{height} pixels")
        if pixels > max_pixels:
            raise DecodeError(
                stage,
                "TooManyPixels",
                f"image header claims {width}x{height} = {pixels} pixels > max_pixels {max_pixels}",
            )
        _load(img, stage)
        try:
            return _to_rgb(img)
        except (OSError, ValueError) as exc:
            raise DecodeError(
                stage, "UnsupportedMode", f"cannot convert mode {img.mode} to RGB: {exc}"
            ) from exc


def decode_mask(data: bytes, *, height: int, width: int, num_classes: int | None) -> np.ndarray:
    """Decode a label PNG (mode P or L, values are class ids) and check it against its image.

    Args:
        data: The encoded mask.
        height: The image's height; the mask must match.
        width: The image's width; the mask must match.
        num_classes: Values must be below this or 255 (ignore); None skips the check.

    Returns:
        uint8 (H, W) class ids.

    Raises:
        DecodeError: Stage ``"decode_mask"``: not a PNG, wrong size (checked on the header),
            a mode other than P/L, truncated data, or class ids out of range.
    """
    stage: Stage = "decode_mask"
    img = _open(data, stage, ("PNG",), height * width)
    with img:
        if img.size != (width, height):
            w, h = img.size
            raise DecodeError(
                stage,
                "SizeMismatch",
                f"mask is {w}x{h} pixels but its image is {width}x{height}",
            )
        if img.mode not in ("P", "L"):
            raise DecodeError(
                stage,
                "UnsupportedMode",
                f"a mask must be an indexed (P) or 8-bit grayscale (L) PNG, got mode {img.mode}",
            )
        _load(img, stage)
        mask = np.array(img, dtype=np.uint8)
    if num_classes is not None:
        bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
        if bad.any():
            values = np.unique(mask[bad])
            shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
            raise DecodeError(
                stage,
                "LabelOutOfRange",
                f"mask has {int(bad.sum())} pixels with class ids outside [0, {num_classes}) "
                f"and not {IGNORE_INDEX}: {shown}",
            )
    return mask


# ----------------------------------------------------------------------------- internals


def _pillow_hard_limit() -> int | None:
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * int(Image.MAX_IMAGE_PIXELS)


_BOMB_LOCK = threading.Lock()


@contextlib.contextmanager
def _bomb_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb limit raised to ``max_pixels`` where that is higher (the
    large-image limit of tiled runs), for the header check; ours is applied after it."""
    default = Image.MAX_IMAGE_PIXELS
    if default is None or max_pixels <= 2 * default:
        yield
        return
    with _BOMB_LOCK:
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = default


def _open(data: bytes, stage: Stage, formats: tuple[str, ...], max_pixels: int) -> Image.Image:
    """Open lazily (header only) with only the allowed format plugins."""
    if not data:
        raise DecodeError(stage, "EmptyObject", "the object is empty (0 bytes)")
    try:
        with warnings.catch_warnings(), _bomb_limit(max_pixels):
            # Sizes between Pillow's warning and error limits: we decide below, quietly.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(formats))
    except Image.DecompressionBombError as exc:
        size = _bomb_size(data, formats)
        claimed = f"{size[0]}x{size[1]} = {size[0] * size[1]}" if size else _bomb_pixels(exc)
        raise DecodeError(
            stage,
            "TooManyPixels",
            f"image header claims {claimed} pixels > max_pixels {max_pixels}",
        ) from exc
    except Image.UnidentifiedImageError as exc:
        raise DecodeError(
            stage,
            "UnsupportedFormat",
            f"not an image in an allowed format ({', '.join(formats)}); "
            f"{len(data)} bytes starting {data[:8]!r}",
        ) from exc
    except Exception as exc:  # a plugin choking on a malformed or cut-off header
        kind = "Truncated" if "truncated" in str(exc).lower() else "CorruptHeader"
        raise DecodeError(stage, kind, f"{type(exc).__name__}: {exc}") from exc
    fmt = _FORMAT_ALIASES.get(img.format or "", img.format)
    if fmt not in formats:
        img.close()
        raise DecodeError(
            stage, "UnsupportedFormat", f"format {img.format} is not allowed ({', '.join(formats)})"
        )
    return img


def _load(img: Image.Image, stage: Stage) -> None:
    """Decode the pixels; truncated or corrupt data raises."""
    try:
        img.load()
    except Exception as exc:
        text = str(exc)
        kind = "Truncated" if "truncated" in text.lower() else "CorruptData"
        raise DecodeError(stage, kind, f"{type(exc).__name__}: {text}") from exc


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode in _WIDE_GRAY_MODES:
        values = np.asarray(img).astype(np.int64)
        if mode == "I" and values.max(initial=0) <= 255:
            gray = values.clip(0, 255).astype(np.uint8)
        else:
            gray = (values.clip(0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _bomb_size(data: bytes, formats: tuple[str, ...]) -> tuple[int, int] | None:
    """The header size of an image Pillow refused as a bomb, read with the same plugins.

    ``Image.open`` runs each plugin's header parser and then its bomb check; this runs the
    parser alone (no pixels are decoded), only to report the claimed size.
    """
    prefix = data[:16]
    for fmt in formats:
        factory_accept = Image.OPEN.get(fmt)
        if factory_accept is None:
            continue
        factory, accept = factory_accept
        try:
            if accept is not None and not accept(prefix):
                continue
            with factory(io.BytesIO(data), "") as im:
                return int(im.size[0]), int(im.size[1])
        except Exception:
            continue
    return None


def _bomb_pixels(exc: Exception) -> str:
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return found.group(1) if found else "too many"
