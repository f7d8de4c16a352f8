"""How much memory a forward pass needs, computed without running it.

:func:`activation_peak` runs the model on PyTorch's ``meta`` device, where tensors have
shapes but no data, and follows every tensor the pass creates until it is freed: the
largest total alive at once is the activation peak of an inference pass at that input
size, in milliseconds and without allocating it. An FCN's activations grow with the
input's pixels (every layer is convolutional), so one pass gives the bytes per pixel
at any size. The figure counts tensors, not the allocator's slack or a runtime's own
buffers: :mod:`pipeline.plan` scales it by a measured factor.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["activation_peak", "parameter_bytes"]


class _LiveBytes(TorchDispatchMode):
    """Sums the storage bytes of the tensors alive, keeping the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in self._alive:  # a view, or an in-place op's result: no new bytes
                continue
            self._alive.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out

    def _freed(self, key: int, nbytes: int) -> None:
        self._alive.discard(key)
        self.live -= nbytes


def activation_peak(model: nn.Module, height: int, width: int) -> int:
    """Peak bytes of the tensors an fp32 inference pass (and the arg-max) holds at once.

    Args:
        model: A model on the ``meta`` device (build it under ``torch.device("meta")``).
        height: Input height.
        width: Input width.
    """
    image = torch.empty(1, 3, height, width, device="meta")
    mode = _LiveBytes()
    with torch.inference_mode(), mode:
        scores = model(image)
        labels = scores.argmax(1)
        del scores, labels
    return mode.peak


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (as they are: fp32 for a built model)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
