"""The paper's skip-architecture experiment: FCN-32s vs 16s vs 8s under one budget.

Usage:
    fcnpipe experiment skips --output OUT [--num-images 400 --epochs 12]

``run_skips`` trains FCN-32s, FCN-16s and FCN-8s with one backbone, one budget and one
dataset (the synthetic shapes unless a dataset is given) through the real training job, and
returns each variant's val scores for the paper-style table (paper, Table 2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fcn.models import HEADS
from pipeline.config import evolve, make
from pipeline.data.synthetic import write_synthetic
from pipeline.errors import ConfigError
from pipeline.storage import join
from pipeline.train.config import TrainConfig
from pipeline.train.driver import TrainResult, train

__all__ = ["SkipsExperiment", "run_skips"]


@dataclass(frozen=True, kw_only=True)
class SkipsExperiment:
    """FCN-32s vs 16s vs 8s under one budget."""

    output_uri: str
    """Output root of the three training runs (and of the synthetic data if made)."""
    dataset_uri: str | None = None
    """Dataset to train on; None: write the synthetic shapes under ``OUT/dataset``."""
    num_images: int = 400
    """Synthetic images (train and val), when no dataset is given."""
    size: int = 128
    """Synthetic image side, when no dataset is given."""
    train: TrainConfig | None = None
    """Everything else of the runs (model is set per variant); None: the defaults below."""
    epochs: int = 12
    """Epochs per variant (when ``train`` is None)."""
    backbone: str = "resnet18"
    """Backbone of all three (when ``train`` is None)."""
    num_workers: int = 2
    """Workers per run (when ``train`` is None)."""
    seed: int = 0
    """Seed of the data and of every run."""

    def __post_init__(self) -> None:
        if self.num_images < 8 or self.size < 32 or self.epochs < 1 or self.num_workers < 1:
            raise ConfigError("need num_images >= 8, size >= 32, epochs and workers >= 1")


def run_skips(
    experiment: SkipsExperiment, *, echo: Callable[[str], None] = print
) -> dict[str, TrainResult]:
    """Train the three variants one after the other; their results by head name.

    Args:
        experiment: What to train on and how long.
        echo: Where progress lines go.
    """
    dataset = experiment.dataset_uri
    if dataset is None:
        dataset = join(experiment.output_uri, "dataset")
        write_synthetic(
            dataset, num_images=experiment.num_images, size=experiment.size, seed=experiment.seed
        )
    base = experiment.train or make(
        TrainConfig,
        dataset_uri=dataset,
        output_uri=experiment.output_uri,
        backbone=experiment.backbone,
        crop_size=experiment.size,
        scale_range=(0.75, 1.25),
        batch_size=8,
        epochs=experiment.epochs,
        optimizer="adamw",
        lr=2e-3,
        weight_decay=1e-4,
        num_workers=experiment.num_workers,
        seed=experiment.seed,
    )
    results = {}
    for head in HEADS:
        run_id = f"skips-{head}-s{experiment.seed}"
        echo(f"training {head}_{base.model.backbone} as run {run_id}")
        config = evolve(
            base, dataset_uri=dataset, head=head, run_id=run_id, overwrite=True, init_from=None
        )
        results[head] = train(config, echo=echo)
    return results
