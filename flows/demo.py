"""The one-command demo on embedded defaults: synthetic bucket in, queried results out.

Usage:
    fcnpipe demo [--workdir fcnpipe-demo]

It makes the synthetic shapes dataset (VOC layout) in a local "bucket" directory, runs
``train_and_segment_flow`` through Prefect (its ephemeral server unless PREFECT_API_URL names
one) on an embedded Ray: FCN-8s trained from scratch with DDP on 2 Ray Train workers, then the
val split segmented by a Ray Data actor into the result tables. While it runs it shows the
progress of decoding, training and segmentation (bars on a terminal); Ray's and Prefect's own
messages go to a log file under the work directory. It ends by printing the paper's metrics,
two example queries with their answers (the per-class IoU, the hardest images), and where
the HTML report is: about 55 lines in all.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from fcn import synthetic
from flows.pipelines import TrainAndSegmentResult, train_and_segment_flow
from pipeline.config import make
from pipeline.data.synthetic import write_synthetic
from pipeline.errors import ConfigError
from pipeline.plan import AUTO, Auto
from pipeline.results.output import print_paper_table, print_result
from pipeline.train.config import TrainConfig

__all__ = ["TARGET_MEAN_IOU", "DemoConfig", "example_queries", "run_demo"]

TARGET_MEAN_IOU = 0.8
"""The val mean IoU the default demo reaches (printed next to the measured one)."""


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """What the demo makes and how long it trains."""

    workdir: Path = Path("fcnpipe-demo")
    """Directory for the local bucket, the result tables and the report."""
    num_images: int = 400
    """Synthetic images (train and val together)."""
    size: int = 128
    """Image side in pixels."""
    epochs: int = 20
    """Passes over the train split."""
    crop_size: int | None = 96
    """Side of the training crops (None: the image size). Smaller than the images: each
    step costs about half as much, and thin strokes keep their width (no rescaling)."""
    scale_range: tuple[float, float] = (1.0, 1.0)
    """Random rescale range of the training crops; none (1, 1) by default: in this short budget
    the net underfits, and rescaling the 2-6 px strokes only makes them harder."""
    model: str = "fcn8s"
    """FCN head."""
    backbone: str = "resnet18"
    """Backbone, trained from scratch (nothing is downloaded)."""
    batch_size: int = 8
    """Crops per worker per step."""
    lr: float = 5e-3
    """AdamW learning rate (poly decay)."""
    class_weighting: str = "none"
    """Loss weights per class: ``none`` or ``median_frequency``."""
    num_workers: int | Auto = AUTO
    """Ray Train workers (DDP ranks); auto: sized from the machine (``pipeline.plan``)."""
    num_cpus: int | None = None
    """CPUs of the embedded Ray (None: all cores)."""
    seed: int = 0
    """Seed for data, weights and order."""
    val_fraction: float = 0.25
    """Share of images in the val split."""

    def __post_init__(self) -> None:
        if self.num_images < 8:
            raise ConfigError(f"num_images must be >= 8, got {self.num_images}")
        if self.size < 32:
            raise ConfigError(f"size must be >= 32 pixels, got {self.size}")
        if (
            self.epochs < 1
            or self.batch_size < 1
            or (self.num_workers != AUTO and self.num_workers < 1)
        ):
            raise ConfigError("epochs, batch_size and num_workers must be >= 1")

    def train_config(self, dataset_uri: str, output_uri: str) -> TrainConfig:
        """The training job of the flow."""
        return make(
            TrainConfig,
            dataset_uri=dataset_uri,
            output_uri=output_uri,
            head=self.model,
            backbone=self.backbone,
            crop_size=min(self.crop_size or self.size, self.size),
            scale_range=self.scale_range,
            batch_size=self.batch_size,
            epochs=self.epochs,
            optimizer="adamw",
            lr=self.lr,
            weight_decay=1e-4,
            class_weighting=self.class_weighting,
            schedule="poly",
            seed=self.seed,
            num_workers=self.num_workers,
            # Block order plus a local buffer: a global shuffle of the split costs ~4 s an
            # epoch on 2 cores, a fifth of the epoch.
            shuffle="blocks",
        )


def example_queries(segment_run: str) -> dict[str, str]:
    """Title -> SQL of the queries the demo prints (over the views ``fcnpipe query`` has).

    Args:
        segment_run: The run id the per-class and per-image queries look at.
    """
    return {
        "IoU per class, summed over images (equals the run's class_iou)": (
            'SELECT class_name, round(sum(intersection) / sum("union"), 3) AS iou '
            f"FROM class_metrics WHERE run_id = '{segment_run}' "
            "GROUP BY class_id, class_name ORDER BY class_id"
        ),
        "the three hardest images": (
            "SELECT image_id, round(avg(iou), 3) AS mean_iou FROM class_metrics "
            f"WHERE run_id = '{segment_run}' GROUP BY image_id ORDER BY mean_iou LIMIT 3"
        ),
    }


def run_demo(config: DemoConfig, console: Console | None = None) -> TrainAndSegmentResult:
    """Make the bucket, run the flow, print the results and example queries.

    Args:
        config: What to make and how long to train.
        console: Where the summary goes (stdout when None).
    """
    from pipeline.results.reader import Results

    console = console or Console()
    started = time.perf_counter()
    workdir = config.workdir.resolve()
    dataset_uri = str(workdir / "bucket" / "shapes")
    output_uri = str(workdir / "results")
    write_synthetic(
        dataset_uri,
        num_images=config.num_images,
        size=config.size,
        seed=config.seed,
        val_fraction=config.val_fraction,
    )
    console.print(
        f"dataset: {config.num_images} synthetic {config.size} px images "
        f"({len(synthetic.CLASS_NAMES)} classes) at {dataset_uri}"
    )
    result = train_and_segment_flow(
        config.train_config(dataset_uri, output_uri),
        html_report=str(workdir / "report.html"),
        num_cpus=config.num_cpus,
    )
    seconds = time.perf_counter() - started

    print_paper_table(
        console,
        {
            "training (best epoch)": result.train.scores,
            "segmentation": result.segment.scores,
        },
        title=f"FCN-8s ({config.backbone}, from scratch): the paper's metrics on the val split",
        label="run",
    )

    with Results(output_uri) as results:
        for title, sql in example_queries(result.segment.run_id).items():
            command = f"fcnpipe query {shlex.quote(output_uri)} {shlex.quote(sql)}"
            console.print(f"\n[bold]{escape(title)}[/]\n$ {escape(command)}", soft_wrap=True)
            print_result(console, results.query(sql))  # what that command prints
    mean_iou = result.segment.scores["mean_iou"]
    console.print(
        f"val mean IoU {mean_iou:.3f} (target {TARGET_MEAN_IOU}); "
        f"demo took {seconds:.0f} s\nmodel:  {result.train.model_uri}\ntables: {output_uri}\n"
        f"report: {result.html_report}\n"
        f"more:   fcnpipe report {output_uri} {result.segment.run_id}",
        highlight=False,
        soft_wrap=True,
    )
    return result
