"""Per-pixel cross-entropy for segmentation, with ignored pixels (label 255).

The FCN reference trains with Caffe's ``SoftmaxWithLoss`` and ``normalize:
false``: the loss is *summed* over pixels (and paired with a tiny learning
rate). ``normalize=True`` averages over the non-ignored pixels instead, as
PyTorch's default ``reduction="mean"`` does. Either way a batch whose pixels are
all ignored gives a loss of 0 and a zero gradient, not NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SegmentationLoss", "median_frequency_weights", "segmentation_loss"]


def segmentation_loss(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = 255,
    normalize: bool = True,
    weight: Tensor | None = None,
) -> Tensor:
    """Cross-entropy over all non-ignored pixels.

    Args:
        logits: (N, C, H, W) unnormalised class scores.
        target: (N, H, W) class ids in [0, C) or ``ignore_index``; any integer dtype
            (uint8 masks are converted to long).
        ignore_index: target value whose pixels contribute nothing.
        normalize: average over the non-ignored pixels (weighted by ``weight``, as
            PyTorch's ``reduction="mean"``) when True; sum when False (Caffe
            ``SoftmaxWithLoss`` with ``normalize: false``).
        weight: optional (C,) class weights, on the logits' device.

    Returns:
        A scalar tensor; 0 with a zero gradient when every pixel is ignored.
    """
    if logits.ndim < 2 or tuple(target.shape) != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            "expected logits (N, C, ...) and target (N, ...), got logits "
            f"{tuple(logits.shape)} and target {tuple(target.shape)}"
        )
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class ids, got dtype {target.dtype}")
    target = target.long()
    # Summing never divides by zero: an all-ignore batch sums to exactly 0.
    total = F.cross_entropy(
        logits, target, weight=weight, ignore_index=ignore_index, reduction="sum"
    )
    if not normalize:
        return total
    valid = target != ignore_index
    if weight is None:
        denom = valid.sum().to(total.dtype)
    else:
        # PyTorch's "mean" divides by the summed weights of the counted pixels.
        denom = (weight[target.masked_fill(~valid, 0)] * valid).sum().to(total.dtype)
    # Dividing by 1 when nothing counts keeps 0 (and its zero gradient) without a host sync.
    return total / torch.where(denom > 0, denom, torch.ones_like(denom))


class SegmentationLoss(nn.Module):
    """Module form of :func:`segmentation_loss`; ``weight`` is a buffer, so ``.to()`` moves it.

    Args:
        ignore_index: target value whose pixels contribute nothing.
        normalize: average over non-ignored pixels (True) or sum (False).
        weight: optional (C,) class weights.
    """

    weight: Tensor | None

    def __init__(
        self, *, ignore_index: int = 255, normalize: bool = True, weight: Tensor | None = None
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.normalize = normalize
        self.register_buffer("weight", None if weight is None else weight.detach().clone())

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss of one batch; see :func:`segmentation_loss`."""
        return segmentation_loss(
            logits,
            target,
            ignore_index=self.ignore_index,
            normalize=self.normalize,
            weight=self.weight,
        )

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, normalize={self.normalize}"


def median_frequency_weights(pixel_counts: Sequence[int] | np.ndarray) -> tuple[float, ...]:
    """Median-frequency class weights (Eigen & Fergus): median frequency / class frequency.

    A frequent class weighs less than 1, a rare one more; a class never seen gets 1 (it has
    no pixels to weigh).

    Args:
        pixel_counts: Labelled pixels per class over the training masks (ignore excluded).
    """
    counts = np.asarray(pixel_counts, dtype=np.float64)
    freq = counts / max(1.0, float(counts.sum()))
    median = float(np.median(freq[freq > 0])) if (freq > 0).any() else 1.0
    return tuple(float(median / f) if f > 0 else 1.0 for f in freq)
