"""The installed ``fcnpipe`` entry point: pipeline commands plus the demo.

Usage:
    fcnpipe demo [--workdir DIR]

``pipeline.cli`` holds the commands that run without Prefect; this module adds
the ones that orchestrate them, so that ``pipeline`` never imports Prefect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli import app, run

__all__ = ["app", "main"]


@app.command()
def demo(
    workdir: Annotated[
        Path, typer.Option(help="Where the demo's bucket, outputs and report go.")
    ] = Path("fcnpipe-demo"),
    num_images: Annotated[int, typer.Option(min=4, help="Synthetic images to make.")] = 160,
    size: Annotated[int, typer.Option(min=32, help="Image side in pixels.")] = 128,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed for data, weights and order.")] = 0,
) -> None:
    """Make a synthetic dataset, train an FCN-8s on it and report the paper's metrics."""
    from pipeline.demo import DemoConfig, run_demo

    run_demo(
        DemoConfig(workdir=workdir, num_images=num_images, size=size, epochs=epochs, seed=seed)
    )


def main() -> None:
    """Console-script entry point."""
    run(app)


if __name__ == "__main__":
    main()
