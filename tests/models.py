"""Small models the tests share: trained a little, in a few seconds, on synthetic shapes."""

from __future__ import annotations

import torch

from fcn.engine import train_step
from fcn.models import build_model
from fcn.optim import build_optimizer
from fcn.synthetic import CLASS_NAMES, make_sample
from fcn.transforms import train_transform


def trained_fcn(size: int = 64, steps: int = 60, threads: int = 2) -> torch.nn.Module:
    """An FCN-8s ResNet-18 trained a little on synthetic shapes, in fp32 (a few seconds)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = build_model("fcn8s_resnet18", len(CLASS_NAMES))
        optimizer = build_optimizer(model, "adamw", lr=3e-3, weight_decay=0.0)
        augment = train_transform(size, scale_range=(1.0, 1.0))
        samples = [make_sample(i, size=size, seed=1) for i in range(16)]
        model.train()
        for step in range(steps):
            pairs = [augment(*samples[(step * 4 + k) % len(samples)]) for k in range(4)]
            images = torch.stack([p[0] for p in pairs])
            masks = torch.stack([p[1] for p in pairs])
            train_step(model, images, masks, optimizer)
        return model.eval()
    finally:
        torch.set_num_threads(previous)
