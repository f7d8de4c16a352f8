"""The entry point of a Ray Job: one training or segmentation run from a JSON configuration.

Usage (what ``flows.ray_jobs`` submits through the Jobs API; runs on the cluster's head):
    python -m pipeline.jobs train '{"dataset_uri": "s3://...", "output_uri": "s3://...", ...}'
    python -m pipeline.jobs segment '{"input_uri": "...", "model_uri": "...", ...}'

The JSON is the same typed configuration (``TrainConfig``, ``SegmentConfig``) the CLI and the
flows build (:mod:`pipeline.config`), validated again here, so a job fails at its first line
on a field the cluster's fcnpipe does not know. Inside a Ray Job ``RAY_ADDRESS`` is set and
the run joins the cluster (``pipeline.cluster.ensure_ray``). Results go to the tables under
the output root, which is where the flow reads them: the job's output is only its log,
quiet as the CLI's (``pipeline.console``; ``FCNPIPE_LOG_LEVEL`` in the job's environment
sets it), with everything else in a log file on the node the job's driver runs on.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from pipeline.console import level_from, log_path, session
from pipeline.tables import RUN_KINDS, RunKind

__all__ = ["config_class", "entrypoint", "main"]


def config_class(kind: RunKind) -> type[Any]:
    """The configuration class of a job kind (``train`` or ``segment``)."""
    if kind == "train":
        from pipeline.train.config import TrainConfig

        return TrainConfig
    from pipeline.segment.config import SegmentConfig

    return SegmentConfig


def entrypoint(kind: RunKind, config: Any) -> str:
    """The shell command a Ray Job runs for ``config``."""
    import shlex

    from pipeline.config import to_json

    return f"python -m pipeline.jobs {kind} {shlex.quote(to_json(config))}"


def main(argv: list[str] | None = None) -> int:
    """Run one job; the exit status is the job's status as the Jobs API reports it.

    Args:
        argv: ``[KIND, CONFIG_JSON]`` (default: ``sys.argv[1:]``).
    """
    from pipeline.config import from_json

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in RUN_KINDS:
        print(
            f"usage: python -m pipeline.jobs {{{'|'.join(RUN_KINDS)}}} CONFIG_JSON", file=sys.stderr
        )
        return 2
    kind: RunKind = "train" if args[0] == "train" else "segment"
    config = from_json(config_class(kind), args[1])
    path = log_path(f"{kind}-{config.run_id or 'run'}", config.output_uri)
    # The job's log is what `ray job logs` shows and the flow follows: the job's lines and a
    # progress line every 10 s (the flow turns those into its bars and Prefect artifact).
    with session(path, level=level_from(False), plain_step=0.0) as out:
        out.echo(f"log: {path} on {socket.gethostname()}")
        if kind == "train":
            from pipeline.train.driver import train

            result = train(config, echo=out.echo)
            out.echo(f"model: {result.model_uri}")
        else:
            from pipeline.segment.driver import segment

            segmented = segment(config, echo=out.echo)
            out.echo(f"segmented {segmented.num_images} images ({segmented.num_errors} errors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
