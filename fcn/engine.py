"""One-process training and evaluation steps, shared by every trainer.

These are the pieces a Ray Train worker, a benchmark's bare loop and the demo all
run: one optimisation step on a batch of crops, and evaluation of full-size images
into one confusion matrix (the paper's protocol: metrics from the matrix summed
over the whole split, never averaged per image). Distribution is the caller's
business: wrap the model in DDP before calling :func:`train_step`, and call
``ConfusionMatrix.reduce()`` on the result of :func:`evaluate`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from fcn.losses import segmentation_loss
from fcn.metrics import ConfusionMatrix

__all__ = ["evaluate", "predict", "train_step"]


def train_step(
    model: nn.Module,
    images: Tensor,
    masks: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    normalize_loss: bool = True,
    class_weight: Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Run forward, backward and one optimizer step on a batch; return the loss.

    Args:
        model: the network in train mode (possibly DDP-wrapped).
        images: (N, 3, H, W) float inputs on the model's device.
        masks: (N, H, W) integer targets, 255 = ignore.
        optimizer: stepped once; gradients are zeroed first.
        normalize_loss: average over labelled pixels (True) or sum them.
        class_weight: optional (C,) class weights for the loss.
        autocast_dtype: run the forward pass under ``torch.autocast`` with this
            dtype (bf16 on GPU); None runs in full precision.
    """
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(
        device_type=images.device.type,
        dtype=autocast_dtype or torch.float32,
        enabled=autocast_dtype is not None,
    ):
        logits = model(images)
    # The loss in float32: bf16 log-softmax over many pixels loses precision.
    loss = segmentation_loss(logits.float(), masks, normalize=normalize_loss, weight=class_weight)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.inference_mode()
def predict(model: nn.Module, image: Tensor) -> Tensor:
    """Class ids for one image or a batch of equal-size images.

    Args:
        model: the network in eval mode.
        image: (3, H, W) or (N, 3, H, W) float input on the model's device.

    Returns:
        (H, W) or (N, H, W) int64 class ids.
    """
    batch = image.unsqueeze(0) if image.ndim == 3 else image
    labels = model(batch).argmax(1)
    return labels[0] if image.ndim == 3 else labels


def evaluate(
    model: nn.Module,
    samples: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
) -> ConfusionMatrix:
    """Accumulate one confusion matrix over full-size images.

    Args:
        model: the network; it is put in eval mode.
        samples: (image (3, H, W) float, mask (H, W) int) pairs, each at its own size.
        num_classes: number of classes of the model.
        device: where the model runs and the matrix is accumulated.

    Returns:
        The local matrix: call ``reduce()`` on it under DDP before scoring.
    """
    model.eval()
    confusion = ConfusionMatrix(num_classes, device=device)
    for image, mask in samples:
        confusion.update(predict(model, image.to(device)), mask.to(device))
    return confusion
