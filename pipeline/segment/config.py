"""The segmentation job's configuration: which images, which model, where, how wide.

``SegmentConfig`` holds the job's identity (input, model, output root, run id) and three
sections: ``data`` (which images, at what size, read how), ``scaling`` (actors, devices,
batches), ``output`` (what is written besides the tables) and ``compute`` (precision, memory
layout, compilation: :mod:`pipeline.compute`). See :mod:`pipeline.config` for
how the CLI, the flows and Ray Jobs share it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from pipeline.compute import ComputeConfig
from pipeline.config import FORBID, check_choice
from pipeline.data.reading import DatasetConfig
from pipeline.errors import ConfigError
from pipeline.plan import AUTO, Auto
from pipeline.segment.engines import BACKENDS, Backend
from pipeline.tables import validate_run_id

_STREAM_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,127}")

__all__ = ["SegmentCompute", "SegmentConfig", "SegmentData", "SegmentOutput", "SegmentScaling"]


@dataclass(frozen=True, kw_only=True)
class SegmentData:
    """Which images, at what size, read how."""

    __pydantic_config__: ClassVar[dict[str, str]] = FORBID

    split: str | None = None
    """Only this split (e.g. ``val``); None: every image."""
    resize: int | None = None
    """Run the model with the longer image side scaled to this, then upsample the scores
    back: label maps are always at the image's own size. None: no resizing."""
    tile: int | None = None
    """Cut images larger than this side into overlapping tile x tile windows, blended and
    stitched (``pipeline.segment.tiles``); the 50 MP ``max_pixels`` limit then gives way to
    ``max_scene_pixels``. None: every image runs whole."""
    overlap: int = 128
    """Pixels neighbouring tiles share (at most tile / 2)."""
    read: DatasetConfig = field(default_factory=DatasetConfig)
    """Reading and decoding options (limits, layout, storage)."""

    def __post_init__(self) -> None:
        if self.resize is not None and self.resize < 8:
            raise ConfigError(f"resize must be >= 8 pixels, got {self.resize}")
        if self.tile is not None:
            from fcn.tiling import check_tiling

            try:
                check_tiling(self.tile, self.overlap)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if self.resize is not None:
                raise ConfigError("--tile and --resize exclude each other: tiles keep the detail")


@dataclass(frozen=True, kw_only=True)
class SegmentScaling:
    """How many inference actors, on what, with how many pixels per model call.

    ``auto`` fields are sized from the cluster by :func:`pipeline.plan.plan_segment`; a value
    given wins.
    """

    __pydantic_config__: ClassVar[dict[str, str]] = FORBID

    actors: int | Auto = AUTO
    """Inference actors; auto: as many as the cluster's nodes hold (the pool grows with an
    autoscaling cluster, and shrinks to one if nodes are lost)."""
    batch_size: int = 16
    """Most images per actor call."""
    batch_pixels: int | Auto = AUTO
    """Most pixels one model call stacks: images of equal size batch up to it, an image over
    it runs alone; auto: 4 MP (4194304), less where an actor's memory is short."""
    use_gpu: bool | None = None
    """Run the actors on GPUs (``gpus_per_actor`` each); unset: when the cluster has GPUs."""
    gpus_per_actor: float = 1.0
    """GPUs per actor on GPUs (fractions share a GPU)."""
    cpus_per_actor: float | Auto = AUTO
    """CPUs Ray reserves per actor; auto: each node's CPUs but a read share, in actors of at
    most 8 (1 with a GPU)."""
    threads_per_actor: int | Auto = AUTO
    """torch (or engine) threads per actor; auto: its CPUs, rounded up."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "actors", "batch_pixels", "threads_per_actor"):
            value = getattr(self, name)
            if value != AUTO and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.cpus_per_actor != AUTO and self.cpus_per_actor <= 0:
            raise ConfigError(f"cpus_per_actor must be > 0, got {self.cpus_per_actor}")
        if self.gpus_per_actor <= 0:
            raise ConfigError(f"gpus_per_actor must be > 0, got {self.gpus_per_actor}")


@dataclass(frozen=True, kw_only=True)
class SegmentOutput:
    """What is written besides the tables, and how the tables' files are cut."""

    __pydantic_config__: ClassVar[dict[str, str]] = FORBID

    palette: bool = False
    """Write label-map PNGs with the VOC colour palette (pixel values are still class ids)."""
    write_png: str | None = None
    """Also write each label map as ``<write_png>/<image_id>.png``."""
    rows_per_file: int = 2000
    """Rows per Parquet file (also what a crash can cost: unflushed rows are redone)."""
    inline_max_pixels: int = 16 * 2**20
    """Largest tiled image whose label map is a PNG in its predictions row (16 MP); a larger
    one is a tiled TIFF object (``label_map_uri``), with a preview PNG in the row."""

    def __post_init__(self) -> None:
        if self.rows_per_file < 1:
            raise ConfigError(f"rows_per_file must be >= 1, got {self.rows_per_file}")
        if self.inline_max_pixels < 1:
            raise ConfigError(f"inline_max_pixels must be >= 1, got {self.inline_max_pixels}")


@dataclass(frozen=True, kw_only=True)
class SegmentCompute(ComputeConfig):
    """The precision policy, plus the engine that runs the model."""

    __pydantic_config__: ClassVar[dict[str, str]] = FORBID

    backend: Backend = "auto"
    """``auto`` (the fastest installed engine on each actor's machine, measured), ``torch``,
    ``onnxruntime`` (fp32) or ``openvino`` (the ONNX ones run the artifact's ONNX export)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("backend", self.backend, BACKENDS)


@dataclass(frozen=True, kw_only=True)
class SegmentConfig:
    """One segmentation job: which images, which model, where the tables go, how wide."""

    __pydantic_config__: ClassVar[dict[str, str]] = FORBID

    input_uri: str
    """Dataset root (VOC, images/ + masks/, or any prefix of images) or a manifest."""
    model_uri: str
    """Model artifact (``OUT/models/<run_id>``) to segment with."""
    output_uri: str
    """Output root of the tables."""
    run_id: str | None = None
    """Run id (a letter, then letters, digits, ``._-``); None: a new one. The same id completes
    a crashed run."""
    overwrite: bool = False
    """Replace a committed run with the same id."""
    stream: str | None = None
    """Incremental: segment only the objects that no committed run of this stream under the
    output root has segmented (or failed on) in their current version with this model (key:
    image URI + ETag, else size + modification time); record the listing so the
    predictions_latest view drops deleted objects. A new model for the stream re-segments
    everything. None: segment every image."""
    data: SegmentData = field(default_factory=SegmentData)
    """Which images, at what size, read how."""
    scaling: SegmentScaling = field(default_factory=SegmentScaling)
    """Actors, devices, batches."""
    output: SegmentOutput = field(default_factory=SegmentOutput)
    """What is written besides the tables."""
    compute: SegmentCompute = field(default_factory=SegmentCompute)
    """Engine, precision, memory layout, compilation (chosen on each actor for ``auto``)."""

    def __post_init__(self) -> None:
        if self.run_id is not None:
            validate_run_id(self.run_id)
        if self.stream is not None and not _STREAM_RE.fullmatch(self.stream):
            raise ConfigError(
                f"invalid stream name {self.stream!r}: use a letter, then up to 127 letters, "
                "digits, '-', '_' or '.'"
            )
