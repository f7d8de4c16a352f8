"""Inference engines: a trained model loaded and run for segmentation, behind one interface.

An engine loads a model artifact once, says how it runs (its name and precision policy), and
turns a batch of normalized images into class ids at the images' own size. The inference
actors (:mod:`pipeline.segment.actor`) and the benchmarks' bare loops use the same engine, so
a benchmark's "bare model" is exactly what the pipeline runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.compute import ComputeConfig, ComputePlan, inference_probe, resolve
from pipeline.storage import StorageOptions

if TYPE_CHECKING:
    import torch

    from pipeline.artifacts import ModelCard

__all__ = ["PROBE_SIDE", "TorchEngine"]

PROBE_SIDE = 256
"""Side of the precision probe's input where the run has no ``resize`` (images vary)."""


class TorchEngine:
    """The model in PyTorch, under the precision policy of :mod:`pipeline.compute`.

    Args:
        model_uri: The model artifact.
        device: Where it runs.
        compute: The precision policy asked (``auto`` is resolved here, on this machine).
        resize: Run the network with the longer side at this, the scores upsampled back.
        storage: How to reach the artifact.
    """

    def __init__(
        self,
        model_uri: str,
        *,
        device: torch.device,
        compute: ComputeConfig,
        resize: int | None = None,
        storage: StorageOptions | None = None,
    ) -> None:
        from pipeline.artifacts import load_artifact

        self.device = device
        self.resize = resize
        model, card = load_artifact(model_uri, device=device, options=storage)
        self.card: ModelCard = card
        """The artifact's model card."""
        side = resize or PROBE_SIDE
        self.plan: ComputePlan = resolve(
            compute,
            device,
            probe=inference_probe(model, (side, side)),
            key=f"segment {self.card.architecture}_{self.card.backbone} 1x{side}x{side}",
        )
        self.model = self.plan.prepare(model)

    @property
    def name(self) -> str:
        """E.g. ``torch 2.14.1``."""
        import torch

        return f"torch {torch.__version__.split('+')[0]}"

    def labels(self, images: Any) -> Any:
        """(N, H, W) int64 class ids of a (N, 3, H, W) float batch of equal-size images."""
        import torch
        import torch.nn.functional as F

        compute = self.plan.compute
        images = images.to(self.device)
        with torch.inference_mode(), compute.autocast(self.device.type):
            size = images.shape[-2:]
            if self.resize is not None and max(size) != self.resize:
                scale = self.resize / max(size)
                small = [max(1, round(side * scale)) for side in size]
                inputs = F.interpolate(images, size=small, mode="bilinear", align_corners=False)
                logits = self.model(compute.inputs(inputs)).float()
                logits = F.interpolate(
                    logits, size=list(size), mode="bilinear", align_corners=False
                )
            else:
                logits = self.model(compute.inputs(images))
            # fp32 scores for the arg-max: near-equal bf16 scores would tie.
            return logits.float().argmax(1)
