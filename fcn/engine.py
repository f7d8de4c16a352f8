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

__all__ = ["evaluate", "forward_backward", "predict", "train_step"]


def forward_backward(
    model: nn.Module,
    images: Tensor,
    masks: Tensor,
    *,
    loss_scale: float = 1.0,
    normalize_loss: bool = True,
    class_weight: Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """Forward and backward on a batch, adding to the gradients; return the (unscaled) loss.

    The building block of gradient accumulation: call it on each micro-batch with
    ``loss_scale = 1 / micro_batches``, then step the optimizer. Under DDP the backward
    pass all-reduces the gradients unless it runs inside ``model.no_sync()``.

    Args:
        model: The network in train mode (possibly DDP-wrapped).
        images: (N, 3, H, W) float inputs on the model's device.
        masks: (N, H, W) integer targets, 255 = ignore.
        loss_scale: Multiplier of the loss before backward.
        normalize_loss: Average over labelled pixels (True) or sum them.
        class_weight: Optional (C,) class weights for the loss.
        autocast_dtype: Run the forward pass under ``torch.autocast`` with this dtype (bf16
            on GPU); None runs in full precision.

    Returns:
        The loss as a 0-dim tensor on the device, detached (reading it syncs the device).
    """
    with torch.autocast(
        device_type=images.device.type,
        dtype=autocast_dtype or torch.float32,
        enabled=autocast_dtype is not None,
    ):
        logits = model(images)
    # The loss in float32: bf16 log-softmax over many pixels loses precision.
    loss = segmentation_loss(logits.float(), masks, normalize=normalize_loss, weight=class_weight)
    (loss * loss_scale if loss_scale != 1.0 else loss).backward()
    return loss.detach()


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
    loss = forward_backward(
        model,
        images,
        masks,
        normalize_loss=normalize_loss,
        class_weight=class_weight,
        autocast_dtype=autocast_dtype,
    )
    optimizer.step()
    return float(loss)


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
