"""The entry point of a Ray Job: one training or segmentation run from a JSON configuration.

Usage (what ``flows.ray_jobs`` submits through the Jobs API; runs on the cluster's head):
    python -m pipeline.jobs train '{"dataset_uri": "s3://...", "output_uri": "s3://...", ...}'
    python -m pipeline.jobs segment '{"input_uri": "...", "model_uri": "...", ...}'

The JSON is the same typed configuration (``TrainConfig``, ``SegmentConfig``) the CLI and the
flows build, validated again here by pydantic, so a job fails at its first line on a field
the cluster's fcnpipe does not know. Inside a Ray Job ``RAY_ADDRESS`` is set and the run joins
the cluster (``pipeline.cluster.ensure_ray``). Results go to the tables under the output root,
which is where the flow reads them: the job's output is only its log.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

__all__ = ["JOB_KINDS", "config_from_json", "config_to_json", "main"]

JobKind = Literal["train", "segment"]
JOB_KINDS: tuple[JobKind, ...] = ("train", "segment")


def _adapter(kind: JobKind) -> Any:
    from pydantic import TypeAdapter

    if kind == "train":
        from pipeline.train import TrainConfig

        return TypeAdapter(TrainConfig)
    if kind == "segment":
        from pipeline.infer import SegmentConfig

        return TypeAdapter(SegmentConfig)
    raise ValueError(f"job kind must be one of {', '.join(JOB_KINDS)}, got {kind!r}")


def config_to_json(kind: JobKind, config: Any) -> str:
    """A job configuration as JSON (every field, defaults included).

    Args:
        kind: ``train`` (a ``TrainConfig``) or ``segment`` (a ``SegmentConfig``).
        config: The configuration.
    """
    return str(_adapter(kind).dump_json(config).decode())


def config_from_json(kind: JobKind, text: str) -> Any:
    """The configuration a JSON text describes, checked as the dataclass checks it.

    Args:
        kind: ``train`` or ``segment``.
        text: JSON from :func:`config_to_json`.

    Raises:
        ValueError: A field is missing, unknown to this version, or invalid (pydantic's
            ``ValidationError`` is a ``ValueError``).
    """
    return _adapter(kind).validate_json(text)


def main(argv: list[str] | None = None) -> int:
    """Run one job; the exit status is the job's status as the Jobs API reports it.

    Args:
        argv: ``[KIND, CONFIG_JSON]`` (default: ``sys.argv[1:]``).
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in JOB_KINDS:
        print(
            f"usage: python -m pipeline.jobs {{{'|'.join(JOB_KINDS)}}} CONFIG_JSON", file=sys.stderr
        )
        return 2
    kind: JobKind = "train" if args[0] == "train" else "segment"
    config = config_from_json(kind, args[1])
    if kind == "train":
        from pipeline.train import train

        result = train(config, echo=lambda line: print(line, flush=True))
        print(f"model: {result.model_uri}", flush=True)
    else:
        from pipeline.infer import segment

        segmented = segment(config, echo=lambda line: print(line, flush=True))
        print(
            f"segmented {segmented.num_images} images ({segmented.num_errors} errors)", flush=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
