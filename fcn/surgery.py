"""Net surgery: bilinear upsampling kernels, the VGG16 fc -> conv transplant, staged init.

Follows ``surgery.py`` of the FCN reference (shelhamer/fcn.berkeleyvision.org):
``upsample_filt`` for the bilinear initialisation of deconvolutions, and the
"convolutionalization" of the classifier's fully connected layers (paper, section 3.1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# torchvision VGG16 ``classifier`` index -> FCN conv layer and its kernel size.
# classifier.6 (fc8, 1000 ImageNet classes) has no counterpart: the score layer is new.
_VGG16_FC = {"classifier.0": ("fc6", 7), "classifier.3": ("fc7", 1)}


@dataclass(frozen=True)
class LoadReport:
    """What a weight transplant did.

    Args:
        loaded: source keys copied into the backbone.
        missing: backbone state-dict keys the source did not provide (left as they were).
        ignored: source keys that have no place in the backbone (e.g. the ImageNet fc8/fc).
    """

    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    ignored: tuple[str, ...]


def upsample_filt(size: int) -> Tensor:
    """The reference 2D bilinear filter of one channel, shape (size, size), float64.

    Args:
        size: kernel size; ``2 * f`` for upsampling by ``f`` with half-pixel centred cells,
            ``2 * f - 1`` for cells centred on pixels (centre tap exactly 1).
    """
    if size < 1:
        raise ValueError(f"kernel size must be >= 1, got {size}")
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float64)
    filt_1d = 1 - (og - center).abs() / factor
    return filt_1d[:, None] * filt_1d[None, :]


def bilinear_kernel(channels: int, size: int) -> Tensor:
    """Weights for a ``ConvTranspose2d(channels, channels, size)`` doing bilinear upsampling.

    Each channel is upsampled on its own: ``upsample_filt(size)`` on the diagonal, zero
    elsewhere, as the reference ``interp`` surgery does.

    Args:
        channels: number of input (= output) channels.
        size: kernel size.

    Returns:
        A float32 tensor of shape (channels, channels, size, size).
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    weight = torch.zeros(channels, channels, size, size)
    idx = torch.arange(channels)
    weight[idx, idx] = upsample_filt(size).to(weight.dtype)
    return weight


def transplant_vgg16_classifier(
    model: nn.Module, vgg16_state_dict: Mapping[str, Tensor]
) -> LoadReport:
    """Copy torchvision VGG16 weights into an FCN VGG16 backbone, fc6/fc7 made convolutional.

    ``features.*`` are copied as they are (the FCN backbone keeps torchvision's indices);
    ``classifier.0`` (fc6, 25088 -> 4096) becomes the 7x7 conv ``fc6`` (4096, 512, 7, 7) and
    ``classifier.3`` (fc7, 4096 -> 4096) the 1x1 conv ``fc7``. torchvision flattens the
    (512, 7, 7) pool5 map channel-major, so a plain reshape keeps every weight in place.
    Shapes are all checked before anything is copied.

    Args:
        model: an FCN with a VGG16 backbone (``model.backbone``), or that backbone itself.
        vgg16_state_dict: the state dict of ``torchvision.models.vgg16()``.

    Returns:
        A ``LoadReport`` naming source keys as torchvision spells them.

    Raises:
        ValueError: if the model has no VGG16 backbone or a tensor has the wrong shape.
    """
    backbone = getattr(model, "backbone", model)
    if not all(hasattr(backbone, name) for name in ("features", "fc6", "fc7")):
        raise ValueError(
            "transplant_vgg16_classifier needs an FCN with a VGG16 backbone "
            f"(features, fc6, fc7); got {type(backbone).__name__}"
        )
    target = backbone.state_dict()
    plan: dict[str, tuple[str, Tensor]] = {}  # source key -> (backbone key, reshaped tensor)
    ignored: list[str] = []
    for key, value in vgg16_state_dict.items():
        layer, _, kind = key.rpartition(".")
        if key.startswith("features.") and key in target:
            plan[key] = (key, value)
        elif layer in _VGG16_FC and kind in ("weight", "bias"):
            conv, ksize = _VGG16_FC[layer]
            dest = f"{conv}.{kind}"
            want = target[dest].shape
            if kind == "weight":
                if value.ndim != 2 or value.numel() != want.numel():
                    raise ValueError(
                        f"{key}: cannot reshape {tuple(value.shape)} into {dest} "
                        f"{tuple(want)} (expected ({want[0]}, {want[1] * ksize * ksize}))"
                    )
                value = value.reshape(want)
            plan[key] = (dest, value)
        else:
            ignored.append(key)
    for key, (dest, value) in plan.items():
        if value.shape != target[dest].shape:
            raise ValueError(
                f"{key}: shape {tuple(value.shape)} does not match the FCN's "
                f"backbone.{dest} {tuple(target[dest].shape)}"
            )
    with torch.no_grad():
        for dest, value in plan.values():
            target[dest].copy_(value)
    filled = {dest for dest, _ in plan.values()}
    return LoadReport(
        loaded=tuple(plan),
        missing=tuple(k for k in target if k not in filled),
        ignored=tuple(ignored),
    )


def transplant_fcn(model: nn.Module, source_state_dict: Mapping[str, Tensor]) -> LoadReport:
    """Initialise an FCN from a coarser trained one: the paper's staged training.

    FCN-16s starts from a trained FCN-32s and FCN-8s from FCN-16s (paper, section 4.2):
    every key the two nets share with the same shape is copied (the backbone, ``score_fr``,
    ``score_pool4`` and the inner ``upscore2``); the new skip layers keep their zero
    initialisation, so the finer net starts out computing exactly the coarser one's
    scores, up to the final upsampler, which keeps its bilinear initialisation.

    Args:
        model: The FCN to initialise.
        source_state_dict: The state dict of a trained FCN with the same backbone and
            number of classes (any head).

    Returns:
        A ``LoadReport``: keys copied, keys of ``model`` left as they were, source keys with
        no place in ``model``.

    Raises:
        ValueError: A shared key has another shape (a different backbone or number of
            classes), naming the key; or no key is shared.
    """
    report = copy_matching(
        model.state_dict(),
        source_state_dict,
        where="the model's",
        hint=" (staged training needs the same backbone and number of classes)",
    )
    if not report.loaded:
        raise ValueError(
            f"no key of the source fits the model (source keys start {list(source_state_dict)[:3]})"
        )
    return report


def copy_matching(
    target: Mapping[str, Tensor],
    source: Mapping[str, Any],
    *,
    where: str,
    hint: str = "",
) -> LoadReport:
    """Copy every key of ``source`` that ``target`` has, all shapes checked before any copy.

    Args:
        target: A state dict to fill in place (e.g. ``model.state_dict()``).
        source: The tensors to copy from; keys ``target`` lacks are reported, not copied.
        where: How the error names the target (e.g. ``"the resnet18 backbone's"``).
        hint: Appended to a shape error.

    Raises:
        ValueError: A shared key is not a tensor of the target's shape (naming the key).
    """
    shared = [key for key in source if key in target]
    for key in shared:
        value = source[key]
        if not isinstance(value, Tensor) or value.shape != target[key].shape:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"{key}: shape {got} does not match {where} {tuple(target[key].shape)}{hint}"
            )
    with torch.no_grad():
        for key in shared:
            target[key].copy_(source[key])
    return LoadReport(
        loaded=tuple(shared),
        missing=tuple(key for key in target if key not in source),
        ignored=tuple(key for key in source if key not in target),
    )
