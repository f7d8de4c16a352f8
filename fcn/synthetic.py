"""A deterministic synthetic "shapes" segmentation dataset with fine boundaries.

Each sample is a textured background (colour gradient, smooth blotches, often
stripes) with 5-11 filled shapes and 2-5 strokes painted on it, back to front
(a later object covers an earlier one), at sizes from a few pixels up. Classes
(:data:`CLASS_NAMES`): background, disc, square (any rotation), triangle, ring
(an outline 4-7 px thick at 128 px) and line (a straight or curved stroke 2-6
px wide at 128 px); lengths scale with min(H, W) / 128.

What and where:

- Colour tells most of the class fast: each object class draws from a
  saturated hue family (disc and ring red, square blue, triangle yellow, line
  green) with jitter and shading; the background is far less saturated. But
  disc and ring share their colours (only shape tells them apart), and a fifth
  of the backgrounds carry stripes in an object class's colours (only context,
  a periodic image-wide pattern, tells them from strokes). A per-pixel colour
  classifier reaches a mean IoU of about 0.6.
- Where needs resolution: strokes and rings are narrower than a stride-16
  cell. With the best possible logits on a grid of stride 32 / 16 / 8,
  bilinearly upsampled (fitted to the masks directly), the mean IoU is about
  0.49 / 0.75 / 0.95 at 128 px, and 0.24 / 0.55 / 0.84 at 64 px: the FCN-32s <
  FCN-16s < FCN-8s ordering is built in, and FCN-8s has room to pass 0.8.

Masks carry, by default, a VOC-style band of 255 (ignore) 1 px wide around
objects (``ignore_border``); ``ignore_border=0`` gives exact masks.

Samples are generated independently from ``numpy.random.default_rng([seed,
index])``, never from a global RNG, so workers can produce disjoint slices in
parallel and get the same bytes as a single process.

Example:
    >>> image, mask = make_sample(7, size=128, seed=0)
    >>> image.shape, image.dtype, mask.shape, mask.dtype
    ((128, 128, 3), dtype('uint8'), (128, 128), dtype('uint8'))
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fcn import IGNORE_INDEX

__all__ = [
    "CLASS_NAMES",
    "IGNORE_INDEX",
    "NUM_CLASSES",
    "Split",
    "SyntheticDataset",
    "SyntheticSample",
    "is_val_index",
    "make_dataset",
    "make_sample",
]

CLASS_NAMES: tuple[str, ...] = ("background", "disc", "square", "triangle", "ring", "line")
"""Class names; index = class id (0 = background)."""

NUM_CLASSES = len(CLASS_NAMES)
"""Number of classes, background included."""


Split = Literal["train", "val"]
"""Split names, as in VOC ``ImageSets/Segmentation/<split>.txt``."""

_REFERENCE_SIZE = 128
"""All lengths below are in pixels at this image size and scale with min(H, W)."""

_HUES: dict[int, float] = {1: 0.0, 2: 220.0, 3: 60.0, 4: 0.0, 5: 130.0}
"""Centre hue (degrees) of each object class: disc and ring red (told apart by
shape only), square blue, triangle yellow, line green."""

_HUE_JITTER = 20.0
"""Per-object hue jitter (degrees, uniform +-)."""

_STRIPE_PROB = 0.6
"""Probability of a stripe pattern in the background."""

_SATURATED_STRIPE_PROB = 0.35
"""Probability that stripes take an object class's colour: only context (a
periodic, image-wide pattern) then tells them from objects and strokes."""

_LINE_WIDTH = (2.5, 6.5)
"""Stroke width range (px at 128 px) before rounding."""

_RING_THICKNESS = (3.5, 7.5)
"""Ring thickness range (px at 128 px) before rounding."""

_OBJECT_SATURATION = (0.55, 1.0)
_OBJECT_VALUE = (0.5, 1.0)
_BACKGROUND_SATURATION = (0.0, 0.3)
_BACKGROUND_VALUE = (0.15, 0.9)


@dataclass(frozen=True, kw_only=True)
class SyntheticSample:
    """One generated image and its mask."""

    image_id: str
    """Stable id, ``shapes_<index:06d>``."""
    index: int
    """Position in the dataset; with the seed, it determines the pixels."""
    split: Split
    """``"train"`` or ``"val"`` (see :func:`is_val_index`)."""
    image: np.ndarray
    """uint8 (H, W, 3) RGB."""
    mask: np.ndarray
    """uint8 (H, W) class ids; 255 (ignore) in the bands of ``ignore_border``."""


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if h < 16 or w < 16:
        raise ValueError(f"size must be at least 16x16 pixels, got {size!r}")
    return int(h), int(w)


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg / 360.0) % 1.0, s, v), dtype=np.float32) * 255.0


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled Gaussian noise on a coarse grid: float32 (H, W, 3), about unit scale."""
    grid = rng.standard_normal(size=(cells, cells, 3), dtype=np.float32)
    planes = [
        np.asarray(
            Image.fromarray(grid[..., c], mode="F").resize((w, h), Image.Resampling.BILINEAR)
        )
        for c in range(3)
    ]
    return np.stack(planes, axis=-1)


def _object_colour(rng: np.random.Generator, cls: int) -> np.ndarray:
    """A colour from the hue family of object class ``cls``: float32 RGB in [0, 255]."""
    hue = _HUES[cls] + rng.uniform(-_HUE_JITTER, _HUE_JITTER)
    return _hsv(hue, rng.uniform(*_OBJECT_SATURATION), rng.uniform(*_OBJECT_VALUE))


def _background(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Mostly low-saturation texture, float32 (H, W, 3) in about [0, 255]."""
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    colours = [
        _hsv(
            rng.uniform(0, 360),
            rng.uniform(*_BACKGROUND_SATURATION),
            rng.uniform(*_BACKGROUND_VALUE),
        )
        for _ in range(2)
    ]
    theta = rng.uniform(0, 2 * math.pi)
    ramp = xx * math.cos(theta) + yy * math.sin(theta)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    image = colours[0] * (1 - ramp[..., None]) + colours[1] * ramp[..., None]
    image += _smooth_noise(rng, h, w, int(rng.integers(3, 8))) * np.float32(rng.uniform(5, 25))
    if rng.random() < _STRIPE_PROB:
        # Stripes: straight and periodic, thin to wide: distractors for strokes and rings.
        period = rng.uniform(5, 20) * scale
        duty = rng.uniform(0.15, 0.5)
        phi = rng.uniform(0, math.pi)
        phase = (xx * math.cos(phi) + yy * math.sin(phi)) / period
        stripes = ((phase - np.floor(phase)) < duty).astype(np.float32)[..., None]
        if rng.random() < _SATURATED_STRIPE_PROB:
            colour = _object_colour(rng, int(rng.integers(1, NUM_CLASSES)))
            image = image * (1 - stripes) + colour * stripes
        else:
            tint = _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.2), 1.0) / 255.0
            image += stripes * tint * np.float32(rng.uniform(-60, 60))
    return image


def _size(rng: np.random.Generator, low: float, high: float) -> float:
    """A length in [low, high]: half the draws log-uniform (more small objects), half uniform."""
    if rng.random() < 0.5:
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.uniform(low, high)


def _draw_object(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, cls: int, h: int, w: int, scale: float
) -> None:
    """Paint one object of class ``cls`` with value 255 on an empty "L" canvas."""
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    if cls == 1:  # disc
        r = _size(rng, 3, 28) * scale
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif cls == 2:  # square, any rotation
        half = _size(rng, 3, 24) * scale * math.sqrt(2)
        a0 = rng.uniform(0, math.pi / 2)
        pts = [
            (cx + half * math.cos(a0 + k * math.pi / 2), cy + half * math.sin(a0 + k * math.pi / 2))
            for k in range(4)
        ]
        draw.polygon(pts, fill=255)
    elif cls == 3:  # triangle, roughly equilateral
        r = _size(rng, 5, 34) * scale
        a0 = rng.uniform(0, 2 * math.pi)
        angles = [a0 + k * 2 * math.pi / 3 + rng.uniform(-0.35, 0.35) for k in range(3)]
        radii = rng.uniform(0.75, 1.0, size=3) * r
        draw.polygon(
            [
                (cx + q * math.cos(a), cy + q * math.sin(a))
                for q, a in zip(radii, angles, strict=True)
            ],
            fill=255,
        )
    elif cls == 4:  # ring: thin circle outline around a background hole
        thickness = max(1, round(rng.uniform(*_RING_THICKNESS) * scale))
        r = max(_size(rng, 6, 28) * scale, thickness + 2.0)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=255, width=thickness)
    else:  # line: a straight or gently curved stroke, 1-3 px wide at 128 px
        width = max(1, round(rng.uniform(*_LINE_WIDTH) * scale))
        length = rng.uniform(30, 110) * scale
        a = rng.uniform(0, 2 * math.pi)
        x1, y1 = cx + length * math.cos(a), cy + length * math.sin(a)
        if rng.random() < 0.5:
            draw.line([(cx, cy), (x1, y1)], fill=255, width=width)
        else:
            bend = rng.uniform(-0.5, 0.5) * length
            mx, my = (cx + x1) / 2 - bend * math.sin(a), (cy + y1) / 2 + bend * math.cos(a)
            t = np.linspace(0.0, 1.0, 24)
            px = (1 - t) ** 2 * cx + 2 * (1 - t) * t * mx + t**2 * x1
            py = (1 - t) ** 2 * cy + 2 * (1 - t) * t * my + t**2 * y1
            draw.line(
                list(zip(px.tolist(), py.tolist(), strict=True)),
                fill=255,
                width=width,
                joint="curve",
            )


def make_sample(
    index: int, *, size: int | tuple[int, int] = 128, seed: int = 0, ignore_border: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Generate sample ``index`` of the dataset with seed ``seed``.

    The result depends only on (seed, index, size, ignore_border), never on
    other samples or global random state.

    Args:
        index: Sample index, >= 0.
        size: Image size, an int for square images or (height, width); object
            sizes and stroke widths scale with min(height, width) / 128.
        seed: Dataset seed, >= 0.
        ignore_border: Width in pixels (not scaled with ``size``) of a
            VOC-style band of 255 (ignore) painted in the mask just outside
            each object, before the object itself, so a later object covers
            the bands of earlier ones. As in VOC, it keeps one-pixel boundary
            ambiguity out of the loss and the metrics. 0 gives exact masks.

    Returns:
        image: uint8 (H, W, 3) RGB.
        mask: uint8 (H, W) class ids in [0, NUM_CLASSES), or 255 in bands.
    """
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    if ignore_border < 0:
        raise ValueError(f"ignore_border must be >= 0, got {ignore_border}")
    h, w = _hw(size)
    scale = min(h, w) / _REFERENCE_SIZE
    rng = np.random.default_rng([seed, index])

    image = _background(rng, h, w, scale)
    mask = np.zeros((h, w), dtype=np.uint8)
    n_shapes, n_lines = int(rng.integers(5, 12)), int(rng.integers(2, 6))
    classes = [*rng.integers(1, 5, size=n_shapes).tolist(), *[5] * n_lines]
    rng.shuffle(classes)
    for cls in classes:
        canvas = Image.new("L", (w, h), 0)
        _draw_object(ImageDraw.Draw(canvas), rng, cls, h, w, scale)
        colour = _object_colour(rng, cls)
        phi, shading = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.25)
        bbox = canvas.getbbox()
        if bbox is None:  # entirely outside the image
            continue
        # Work inside the object's box, grown by the band (a few % of the image).
        x0, y0 = max(bbox[0] - ignore_border, 0), max(bbox[1] - ignore_border, 0)
        x1, y1 = min(bbox[2] + ignore_border, w), min(bbox[3] + ignore_border, h)
        box = canvas.crop((x0, y0, x1, y1))
        obj = np.asarray(box) > 0
        if ignore_border:
            grown = np.asarray(box.filter(ImageFilter.MaxFilter(2 * ignore_border + 1))) > 0
            mask[y0:y1, x0:x1][grown & ~obj] = IGNORE_INDEX
        ys, xs = np.nonzero(obj)
        # A gentle linear shading across the object, so colours vary inside it.
        ramp = ((xs + x0) * math.cos(phi) + (ys + y0) * math.sin(phi)) / max(h, w) - 0.5
        shade = (1.0 + shading * ramp).astype(np.float32)
        image[ys + y0, xs + x0] = colour * shade[:, None]
        mask[ys + y0, xs + x0] = cls

    noise = rng.standard_normal(size=image.shape, dtype=np.float32)
    image += noise * np.float32(rng.uniform(2, 8)) + np.float32(0.5)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def is_val_index(index: int, val_fraction: float) -> bool:
    """The split rule: index i is "val" when floor((i + 1) * f) > floor(i * f).

    Validation samples are spread evenly (f = 0.2: indices 4, 9, 14, ...), the
    first n indices hold exactly floor(n * f) of them, and a sample's split
    never depends on the dataset's length. ``f`` is read as its shortest decimal
    (0.29 is 29/100), so float rounding cannot move a sample.

    Args:
        index: Sample index, >= 0.
        val_fraction: Fraction of validation samples, in [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    f = Fraction(str(val_fraction))
    return math.floor((index + 1) * f) > math.floor(index * f)


@dataclass(frozen=True, kw_only=True)
class SyntheticDataset:
    """A lazy, picklable description of ``num_images`` samples; pixels are made on access.

    Indexing and iteration generate samples with :func:`make_sample`, so any
    worker can produce any slice, e.g. ``[ds[i] for i in range(lo, hi)]``.
    """

    num_images: int
    """Number of samples."""
    size: int | tuple[int, int] = 128
    """Image size: int (square) or (height, width)."""
    seed: int = 0
    """Dataset seed."""
    val_fraction: float = 0.2
    """Fraction of samples in "val", spread evenly (see :func:`is_val_index`)."""
    ignore_border: int = 1
    """Width in px of the 255 band outside each object in the masks (0 = none)."""

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.ignore_border < 0:
            raise ValueError(f"ignore_border must be >= 0, got {self.ignore_border}")
        _hw(self.size)
        is_val_index(0, self.val_fraction)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> SyntheticSample:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} samples")
        index %= self.num_images
        image, mask = make_sample(
            index, size=self.size, seed=self.seed, ignore_border=self.ignore_border
        )
        return SyntheticSample(
            image_id=self.image_id(index),
            index=index,
            split=self.split_of(index),
            image=image,
            mask=mask,
        )

    def __iter__(self) -> Iterator[SyntheticSample]:
        return (self[i] for i in range(self.num_images))

    @staticmethod
    def image_id(index: int) -> str:
        """The id of sample ``index``: ``shapes_<index:06d>``."""
        return f"shapes_{index:06d}"

    def split_of(self, index: int) -> Split:
        """The split of sample ``index``."""
        return "val" if is_val_index(index, self.val_fraction) else "train"

    def ids(self, split: Split | None = None) -> list[str]:
        """Image ids in index order, of one split or all of them.

        Args:
            split: ``"train"``, ``"val"`` or None for every sample.
        """
        return [
            self.image_id(i)
            for i in range(self.num_images)
            if split is None or self.split_of(i) == split
        ]

    @property
    def class_names(self) -> tuple[str, ...]:
        """The class names, for a ``classes.txt``."""
        return CLASS_NAMES


def make_dataset(
    num_images: int,
    *,
    size: int | tuple[int, int] = 128,
    seed: int = 0,
    val_fraction: float = 0.2,
    ignore_border: int = 1,
) -> SyntheticDataset:
    """Describe a synthetic dataset; samples are generated when indexed or iterated.

    Args:
        num_images: Number of samples, >= 1.
        size: Image size, an int (square) or (height, width), at least 16.
        seed: Dataset seed; the same arguments always give the same pixels.
        val_fraction: Fraction of samples in "val", in [0, 1).
        ignore_border: Width in px of the VOC-style 255 band outside each
            object (see :func:`make_sample`); 0 for exact masks.
    """
    return SyntheticDataset(
        num_images=num_images,
        size=size,
        seed=seed,
        val_fraction=val_fraction,
        ignore_border=ignore_border,
    )
