"""Paired image/mask transforms for segmentation: one train preset, one eval preset.

Built on ``torchvision.transforms.v2`` with ``tv_tensors.Image`` and
``tv_tensors.Mask``, so the image and its mask always move together: images
resize bilinearly (antialiased), masks with nearest neighbour (NEAREST_EXACT,
see :class:`RandomScale`); padding fills images with 0 (black, before
normalization) and masks with 255 (ignore).

Both presets return a picklable callable ``(image, mask | None) -> (image,
mask | None)``: the image comes out float32 (3, H, W), normalized; the mask
int64 (H, W). Inputs may be numpy uint8 (H, W, 3) RGB, PIL images (converted to
RGB) or uint8 tensors (3, H, W); masks numpy uint8 (H, W), PIL "L"/"P" (palette
indices are class ids) or integer tensors (H, W) or (1, H, W).

Randomness comes from torch's global RNG, so ``torch.manual_seed`` makes the
train preset reproducible (and torch's DataLoader seeds each worker apart).

Two input normalizations are supported (see :func:`describe_normalization`):

- ``"imagenet"`` (default): RGB in [0, 1], minus mean (0.485, 0.456, 0.406),
  divided by std (0.229, 0.224, 0.225), as torchvision's pretrained backbones.
- ``"caffe_bgr"``: the reference FCN's (Caffe) preprocessing: float RGB in
  [0, 255] reordered to BGR, minus mean (104.00698793, 116.66876762,
  122.67891434) in B, G, R order; no division.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args, overload

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from fcn import IGNORE_INDEX
from fcn.names import Normalization

__all__ = [
    "IGNORE_INDEX",
    "ImageInput",
    "MaskInput",
    "Normalization",
    "NormalizationSpec",
    "RandomScale",
    "SegmentationTransform",
    "denormalize",
    "describe_normalization",
    "eval_transform",
    "normalization_spec",
    "normalize",
    "train_transform",
]


ImageInput = np.ndarray | Image.Image | torch.Tensor
"""numpy uint8 (H, W, 3) RGB (or (H, W) grey), a PIL image, or a uint8 tensor (3, H, W)."""

MaskInput = np.ndarray | Image.Image | torch.Tensor
"""Integer class ids: numpy/tensor (H, W) (or tensor (1, H, W)), or a PIL "L"/"P" image."""


@dataclass(frozen=True, kw_only=True)
class NormalizationSpec:
    """How uint8 RGB pixels become model input: ``((pixel * scale)[order] - mean) / std``."""

    name: Normalization
    """The normalization's name."""
    channel_order: Literal["RGB", "BGR"]
    """Channel order of the model input; ``mean`` and ``std`` are given in this order."""
    scale: float
    """Factor applied to uint8 pixel values first: 1/255 for [0, 1], 1 for [0, 255]."""
    mean: tuple[float, float, float]
    """Per-channel mean subtracted after scaling, in ``channel_order``."""
    std: tuple[float, float, float]
    """Per-channel divisor applied last, in ``channel_order``."""


_SPECS: dict[str, NormalizationSpec] = {
    "imagenet": NormalizationSpec(
        name="imagenet",
        channel_order="RGB",
        scale=1.0 / 255.0,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    ),
    "caffe_bgr": NormalizationSpec(
        name="caffe_bgr",
        channel_order="BGR",
        scale=1.0,
        mean=(104.00698793, 116.66876762, 122.67891434),
        std=(1.0, 1.0, 1.0),
    ),
}


def normalization_spec(normalization: Normalization) -> NormalizationSpec:
    """The constants of a normalization.

    Args:
        normalization: ``"imagenet"`` or ``"caffe_bgr"``.
    """
    try:
        return _SPECS[normalization]
    except KeyError:
        raise ValueError(
            f"unknown normalization {normalization!r}; expected one of {get_args(Normalization)}"
        ) from None


def describe_normalization(normalization: Normalization) -> dict[str, Any]:
    """A JSON-ready description (name, channel_order, scale, mean, std), e.g. for a model card.

    Args:
        normalization: ``"imagenet"`` or ``"caffe_bgr"``.
    """
    spec = asdict(normalization_spec(normalization))
    spec["mean"], spec["std"] = list(spec["mean"]), list(spec["std"])
    return spec


def _channel_view(values: tuple[float, float, float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(3, 1, 1)


def normalize(image: torch.Tensor, normalization: Normalization = "imagenet") -> torch.Tensor:
    """Turn uint8 RGB images (..., 3, H, W) into float32 model input.

    Args:
        image: uint8 tensor (..., 3, H, W), RGB; a batch works too.
        normalization: ``"imagenet"`` or ``"caffe_bgr"``.
    """
    spec = normalization_spec(normalization)
    if image.dtype != torch.uint8 or image.ndim < 3 or image.shape[-3] != 3:
        raise ValueError(
            f"expected a uint8 (..., 3, H, W) tensor, got {image.dtype} {tuple(image.shape)}"
        )
    x = image.to(torch.float32) * spec.scale
    if spec.channel_order == "BGR":
        x = x.flip(-3)
    return (x - _channel_view(spec.mean, x)) / _channel_view(spec.std, x)


def denormalize(image: torch.Tensor, normalization: Normalization = "imagenet") -> torch.Tensor:
    """Invert :func:`normalize`: float model input (..., 3, H, W) to uint8 RGB (rounded, clamped).

    Args:
        image: float tensor (..., 3, H, W) as made by :func:`normalize`.
        normalization: The normalization it was made with.
    """
    spec = normalization_spec(normalization)
    x = image.to(torch.float32) * _channel_view(spec.std, image) + _channel_view(spec.mean, image)
    if spec.channel_order == "BGR":
        x = x.flip(-3)
    return (x / spec.scale).round().clamp(0, 255).to(torch.uint8)


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    # torch.from_numpy shares memory and warns on read-only arrays (np.asarray(PIL image)).
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = np.array(array, order="C")
    return torch.from_numpy(array)


def _as_image(image: ImageInput) -> tv_tensors.Image:
    if isinstance(image, Image.Image):
        return tv_tensors.Image(F.pil_to_tensor(image.convert("RGB")))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"expected a uint8 (H, W, 3) RGB array, got {image.dtype} {image.shape}"
            )
        return tv_tensors.Image(_from_numpy(image).permute(2, 0, 1))
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"expected a uint8 (3, H, W) RGB tensor, got {image.dtype} {tuple(image.shape)}"
            )
        return tv_tensors.Image(image)
    raise TypeError(f"unsupported image type {type(image).__name__}")


def _as_mask(mask: MaskInput) -> tv_tensors.Mask:
    if isinstance(mask, Image.Image):
        if mask.mode not in ("L", "P"):
            raise ValueError(f"expected a mask in PIL mode 'L' or 'P', got {mask.mode!r}")
        mask = np.asarray(mask)
    tensor = _from_numpy(mask) if isinstance(mask, np.ndarray) else mask
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"unsupported mask type {type(mask).__name__}")
    if tensor.ndim == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 2 or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise ValueError(
            f"expected an integer (H, W) mask, got {tensor.dtype} {tuple(tensor.shape)}"
        )
    if tensor.dtype != torch.uint8:
        # Keep the padding value representable; class ids of any size pass through.
        tensor = tensor.to(torch.int64)
    return tv_tensors.Mask(tensor)


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from ``scale_range`` (same factor for H and W).

    Images resize bilinearly with antialiasing; masks with NEAREST_EXACT, which
    takes the source pixel under each output pixel's centre (as PIL's NEAREST,
    used by torchvision's PIL-based reference). torch's plain NEAREST samples
    ``floor(i * scale)`` instead and shifts masks by up to half a source pixel
    against the bilinear image.

    Args:
        scale_range: (low, high) bounds of the factor, 0 < low <= high.
    """

    def __init__(self, scale_range: tuple[float, float]) -> None:
        super().__init__()
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.scale_range = (float(low), float(high))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw the factor (torch global RNG) and the output size."""
        sizes = {
            tuple(F.get_size(x))
            for x in flat_inputs
            if isinstance(x, tv_tensors.Image | tv_tensors.Mask)
        }
        if len(sizes) != 1:
            raise ValueError(f"expected inputs of one size, got sizes {sorted(sizes)}")
        (h, w) = sizes.pop()
        low, high = self.scale_range
        factor = low + (high - low) * float(torch.rand(()))
        return {"size": [max(1, round(h * factor)), max(1, round(w * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Resize one input to the drawn size."""
        interpolation = (
            v2.InterpolationMode.NEAREST_EXACT
            if isinstance(inpt, tv_tensors.Mask)
            else v2.InterpolationMode.BILINEAR
        )
        return self._call_kernel(
            F.resize, inpt, params["size"], interpolation=interpolation, antialias=True
        )


class SegmentationTransform:
    """Apply paired augmentations (if any), then convert and normalize.

    Module-level and built from ``v2`` transforms only, so it pickles (for
    DataLoader and Ray workers). Build it with :func:`train_transform` or
    :func:`eval_transform`.

    Args:
        augment: Paired ``v2`` transforms on uint8 ``Image``/``Mask``, or None.
        normalization: Input normalization applied after ``augment``.
    """

    def __init__(self, augment: v2.Transform | None, normalization: Normalization) -> None:
        normalization_spec(normalization)  # validate early
        self.augment = augment
        self.normalization: Normalization = normalization

    @overload
    def __call__(self, image: ImageInput, mask: None = None) -> tuple[torch.Tensor, None]: ...

    @overload
    def __call__(self, image: ImageInput, mask: MaskInput) -> tuple[torch.Tensor, torch.Tensor]: ...

    def __call__(
        self, image: ImageInput, mask: MaskInput | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Transform one image and its mask (or None).

        Args:
            image: RGB image, see :data:`ImageInput`.
            mask: Class-id mask of the same height and width, or None.

        Returns:
            float32 (3, H, W) normalized image and int64 (H, W) mask (or None).
        """
        img = _as_image(image)
        msk = None if mask is None else _as_mask(mask)
        if msk is not None and tuple(msk.shape) != tuple(img.shape[-2:]):
            raise ValueError(
                f"mask size {tuple(msk.shape)} differs from image size {tuple(img.shape[-2:])}"
            )
        if self.augment is not None:
            if msk is None:
                img = self.augment(img)
            else:
                img, msk = self.augment(img, msk)
        out = normalize(img.as_subclass(torch.Tensor), self.normalization)
        return out, None if msk is None else msk.as_subclass(torch.Tensor).to(torch.int64)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(augment={self.augment!r}, normalization={self.normalization!r})"
        )


def train_transform(
    crop_size: int | tuple[int, int],
    *,
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip_prob: float = 0.5,
    color_jitter: float = 0.0,
    normalization: Normalization = "imagenet",
) -> SegmentationTransform:
    """The train preset: jitter, random scale, random crop (padded), flip, normalize.

    Order: colour jitter (image only, if ``color_jitter > 0``), random scale,
    random crop to ``crop_size``, horizontal flip, float + normalization. Where
    the scaled image is smaller than the crop, ``v2.RandomCrop`` pads each side
    by the shortfall (image with 0, mask with 255) and then picks the window,
    so the image lands at a random offset.

    Args:
        crop_size: Output size, int (square) or (height, width).
        scale_range: (low, high) of the uniform resize factor; (1, 1) disables it.
        hflip_prob: Probability of a horizontal flip.
        color_jitter: Strength of brightness, contrast and saturation jitter
            (each factor in [1 - s, 1 + s]); 0 disables it. Hue is never
            jittered: in many datasets (the synthetic one included) hue carries
            class identity.
        normalization: ``"imagenet"`` or ``"caffe_bgr"``.
    """
    crop_hw = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    if len(crop_hw) != 2 or min(crop_hw) < 1:
        raise ValueError(f"crop_size must be positive, got {crop_size!r}")
    if not 0.0 <= hflip_prob <= 1.0:
        raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
    if not 0.0 <= color_jitter < 1.0:
        raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter}")
    steps: list[v2.Transform] = []
    if color_jitter > 0:
        steps.append(
            v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter)
        )
    if tuple(scale_range) != (1.0, 1.0):
        steps.append(RandomScale(scale_range))
    steps += [
        v2.RandomCrop(
            list(crop_hw),
            pad_if_needed=True,
            fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX},
        ),
        v2.RandomHorizontalFlip(p=hflip_prob),
    ]
    return SegmentationTransform(v2.Compose(steps), normalization)


def eval_transform(*, normalization: Normalization = "imagenet") -> SegmentationTransform:
    """The eval preset: the full image, unresized and uncropped; float + normalization only.

    Args:
        normalization: ``"imagenet"`` or ``"caffe_bgr"``.
    """
    return SegmentationTransform(None, normalization)
