"""One-process training and evaluation steps, shared by every trainer.

These are the pieces a Ray Train worker, a benchmark's bare loop and the demo all
run: one optimisation step on a batch of crops, and evaluation of full-size images
into one confusion matrix (the paper's protocol: metrics from the matrix summed
over the whole split, never averaged per image). Distribution is the caller's
business: wrap the model in DDP before calling :func:`train_step`, and call
``ConfusionMatrix.reduce()`` on the result of :func:`evaluate`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fcn.losses import segmentation_loss
from fcn.metrics import ConfusionMatrix

__all__ = ["DTYPES", "FP32", "Compute", "evaluate", "forward_backward", "predict", "train_step"]

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
"""Precision names and the dtypes they compute in."""


@dataclass(frozen=True)
class Compute:
    """How a model runs: the precision of its forward pass and the memory layout of its
    tensors.

    ``bf16``/``fp16`` run the forward pass under ``torch.autocast`` (weights, optimizer state
    and gradients stay fp32; the loss and the logits read for an arg-max are fp32 too);
    ``channels_last`` stores convolution weights and activations NHWC, which oneDNN and
    cuDNN run faster. Which one is fastest depends on the machine: ``pipeline.compute``
    chooses.
    """

    precision: str = "fp32"
    """``fp32``, ``bf16`` or ``fp16``."""
    channels_last: bool = False
    """Model and inputs in ``torch.channels_last`` memory format."""

    def __post_init__(self) -> None:
        if self.precision not in DTYPES:
            raise ValueError(
                f"precision must be one of {', '.join(DTYPES)}, got {self.precision!r}"
            )

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the forward pass."""
        return DTYPES[self.precision]

    @property
    def name(self) -> str:
        """E.g. ``bf16 + channels_last``."""
        return self.precision + (" + channels_last" if self.channels_last else "")

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of the forward pass (none for fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.dtype)

    def model(self, model: nn.Module) -> nn.Module:
        """``model`` in this memory format (in place, as ``Module.to`` is)."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return model.to(memory_format=memory_format)

    def inputs(self, images: Tensor) -> Tensor:
        """A (N, C, H, W) batch in this memory format."""
        return (
            images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        )


FP32 = Compute()
"""Full precision, contiguous NCHW: the reference every other choice is checked against."""


def forward_backward(
    model: nn.Module,
    images: Tensor,
    masks: Tensor,
    *,
    loss_scale: float = 1.0,
    normalize_loss: bool = True,
    class_weight: Tensor | None = None,
    compute: Compute = FP32,
    scaler: Any = None,
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
        compute: Precision and memory layout of the forward pass (the model is already in
            its memory format, see :meth:`Compute.model`).
        scaler: A ``torch.amp.GradScaler`` for fp16 (its loss scaling keeps small gradients
            from flushing to zero); None for fp32 and bf16.

    Returns:
        The loss as a 0-dim tensor on the device, detached (reading it syncs the device).
    """
    with compute.autocast(images.device.type):
        logits = model(compute.inputs(images))
    # The loss in float32: a bf16 log-softmax over many pixels loses precision.
    loss = segmentation_loss(logits.float(), masks, normalize=normalize_loss, weight=class_weight)
    scaled = loss * loss_scale if loss_scale != 1.0 else loss
    (scaler.scale(scaled) if scaler is not None else scaled).backward()
    return loss.detach()


def train_step(
    model: nn.Module,
    images: Tensor,
    masks: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    normalize_loss: bool = True,
    class_weight: Tensor | None = None,
    compute: Compute = FP32,
) -> float:
    """Run forward, backward and one optimizer step on a batch; return the loss.

    Args:
        model: the network in train mode (possibly DDP-wrapped).
        images: (N, 3, H, W) float inputs on the model's device.
        masks: (N, H, W) integer targets, 255 = ignore.
        optimizer: stepped once; gradients are zeroed first.
        normalize_loss: average over labelled pixels (True) or sum them.
        class_weight: optional (C,) class weights for the loss.
        compute: precision and memory layout of the forward pass.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = forward_backward(
        model,
        images,
        masks,
        normalize_loss=normalize_loss,
        class_weight=class_weight,
        compute=compute,
    )
    optimizer.step()
    return float(loss)


@torch.inference_mode()
def predict(model: nn.Module, image: Tensor, compute: Compute = FP32) -> Tensor:
    """Class ids for one image or a batch of equal-size images.

    Args:
        model: the network in eval mode (in ``compute``'s memory format).
        image: (3, H, W) or (N, 3, H, W) float input on the model's device.
        compute: precision and memory layout of the forward pass.

    Returns:
        (H, W) or (N, H, W) int64 class ids.
    """
    batch = image.unsqueeze(0) if image.ndim == 3 else image
    with compute.autocast(batch.device.type):
        logits = model(compute.inputs(batch))
    labels = logits.float().argmax(1)  # fp32 arg-max: bf16 would tie near-equal scores
    return labels[0] if image.ndim == 3 else labels


def evaluate(
    model: nn.Module,
    samples: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
    compute: Compute = FP32,
) -> ConfusionMatrix:
    """Accumulate one confusion matrix over full-size images.

    Args:
        model: the network; it is put in eval mode.
        samples: (image (3, H, W) float, mask (H, W) int) pairs, each at its own size.
        num_classes: number of classes of the model.
        device: where the model runs and the matrix is accumulated.
        compute: precision and memory layout of the forward pass (the matrix is int64
            whatever the precision).

    Returns:
        The local matrix: call ``reduce()`` on it under DDP before scoring.
    """
    model.eval()
    confusion = ConfusionMatrix(num_classes, device=device)
    for image, mask in samples:
        confusion.update(predict(model, image.to(device), compute), mask.to(device))
    return confusion
