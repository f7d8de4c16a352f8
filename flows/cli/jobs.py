"""``fcnpipe train`` and ``fcnpipe segment``: one job each, on embedded Ray or a cluster.

Their options are generated from ``TrainConfig`` and ``SegmentConfig`` (one per field, help
from the field's docstring; ``--set FIELD=VALUE`` for any field), so these commands, the
Prefect flows and the Ray Jobs take the very same configuration. Hidden options arm the test
hooks of :mod:`pipeline.faults`, which are never part of a configuration.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import typer
from rich.console import Console

from flows.cli.common import NumCpus, S3Endpoint, Verbose, app, job_output, storage_options
from flows.cli.options import config_command
from pipeline.errors import ConfigError
from pipeline.faults import Faults
from pipeline.segment.config import SegmentConfig
from pipeline.storage import join
from pipeline.train.config import TrainConfig

__all__: list[str] = []

OUTPUT = {"output_uri": ("--output", "-o")}

FailAt = Annotated[
    str | None,
    typer.Option(hidden=True, help="Testing: RANK:EPOCH:STEP[:stall] fails a rank."),
]
FailAfter = Annotated[
    int | None, typer.Option(hidden=True, help="Testing: exit after N predictions.")
]
FailAfterStrips = Annotated[
    int | None, typer.Option(hidden=True, help="Testing: exit after N strips of tiled images.")
]
StallActorsAfter = Annotated[
    int | None, typer.Option(hidden=True, help="Testing: actors stall after N batches.")
]
FaultDir = Annotated[
    str | None, typer.Option(hidden=True, help="Testing: marker directory of the faults.")
]


def _faults(config: TrainConfig | SegmentConfig, fault_dir: str | None, **hooks: Any) -> Faults:
    """The hidden test hooks, their markers under ``--fault-dir`` (default
    ``OUTPUT/_faults/RUN_ID``)."""
    if fault_dir is None and config.run_id is None:
        raise ConfigError("fault injection needs --run-id or --fault-dir")
    root = fault_dir or join(config.output_uri, "_faults", str(config.run_id))
    return Faults(root=root, storage=config.data.read.storage.with_environment(), **hooks)


@config_command(app, "train", TrainConfig, arguments=["dataset_uri"], names=OUTPUT)
def train(
    config: TrainConfig,
    *,
    num_cpus: NumCpus = None,
    verbose: Verbose = False,
    fail_at: FailAt = None,
    fault_dir: FaultDir = None,
) -> None:
    """Train an FCN with DDP on Ray Train; write the model artifact and the run's tables.

    Checkpoints go to OUTPUT/checkpoints/RUN_ID each epoch; rerunning with the same --run-id
    after a crash resumes from the latest one.
    """
    from pipeline.artifacts import load_card
    from pipeline.results.output import print_class_iou, print_paper_table
    from pipeline.train.driver import train as run_train

    faults = None
    if fail_at is not None:
        train_at, stall = Faults.parse_train_at(fail_at)
        faults = _faults(config, fault_dir, train_at=train_at, train_stall=stall)
    with job_output(verbose, "train", config.output_uri) as out:
        result = run_train(config, echo=out.echo, num_cpus=num_cpus, faults=faults)
    if result.scores:
        console = Console()
        label = f"{config.model.name} (epoch {result.epoch + 1})"
        print_paper_table(console, {label: result.scores}, title=f"val split, run {result.run_id}")
        class_names = load_card(result.model_uri, config.data.read.storage).class_names
        print_class_iou(console, list(result.scores["iou"]), class_names)
    typer.echo(f"model: {result.model_uri}")
    ran = result.compute
    layout = " + channels_last" if ran.get("channels_last") else ""
    typer.echo(f"compute: {ran.get('precision')}{layout} ({ran.get('reason')})")
    typer.echo(f"trained in {result.seconds:.0f} s{' (resumed)' if result.resumed else ''}")


@config_command(
    app,
    "segment",
    SegmentConfig,
    arguments=["input_uri"],
    names={**OUTPUT, "model_uri": ("--model", "-m")},
)
def segment(
    config: SegmentConfig,
    *,
    num_cpus: NumCpus = None,
    verbose: Verbose = False,
    fail_after: FailAfter = None,
    fail_after_strips: FailAfterStrips = None,
    stall_actors_after: StallActorsAfter = None,
    fault_dir: FaultDir = None,
) -> None:
    """Segment every image under INPUT_URI into label maps and metrics tables under OUTPUT."""
    from pipeline.results.output import print_class_iou, print_paper_table
    from pipeline.segment.driver import segment as run_segment

    faults = None
    if fail_after is not None or stall_actors_after is not None or fail_after_strips is not None:
        faults = _faults(
            config,
            fault_dir,
            driver_exit_after=fail_after,
            strips_exit_after=fail_after_strips,
            actor_stall_after=stall_actors_after,
        )
    with job_output(verbose, "segment", config.output_uri) as out:
        result = run_segment(config, echo=out.echo, num_cpus=num_cpus, faults=faults)
    if result.scores is not None:
        console = Console()
        print_paper_table(
            console, {result.run_id: result.scores}, title="images with masks", label="run"
        )
        print_class_iou(console, result.scores["iou"], result.class_names)


@app.command()
def export(
    model_uri: Annotated[str, typer.Argument(help="A model artifact (OUT/models/RUN_ID).")],
    fmt: Annotated[
        Literal["onnx"], typer.Option("--format", help="Export format (onnx).")
    ] = "onnx",
    out: Annotated[
        str | None,
        typer.Option(
            help="Write the .onnx file here (default: into the artifact, recorded in its card)."
        ),
    ] = None,
    s3_endpoint: S3Endpoint = None,
) -> None:
    """Export a model artifact as one self-contained ONNX graph: uint8 RGB images in
    (dynamic N, H, W, normalization inside), class ids and logits out."""
    from pipeline.export import OPSET, export_onnx

    info = export_onnx(model_uri, out, options=storage_options(s3_endpoint))
    typer.echo(
        f"wrote {info.uri} ({fmt}, opset {OPSET}, sha256 {info.sha256[:16]}..., "
        f"{info.seconds:.1f} s): input image uint8 [N, 3, H, W]; outputs label_map int64 "
        "[N, H, W], scores float32 logits [N, C, H, W]"
    )
