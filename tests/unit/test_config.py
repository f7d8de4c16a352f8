"""One configuration surface: the job configurations, their JSON, and the CLI made from them.

- every field of ``TrainConfig`` and ``SegmentConfig`` has a docstring, and an option of each
  command that takes the configuration (``fcnpipe train``, ``flow train``, ``schedule train``;
  ``fcnpipe segment``, ``flow segment``), unless it is left to ``--set``;
- the options a user gives, and only those, override the dataclass's defaults; ``--set``
  reaches every field, by dotted path or unique name;
- ``assign`` and ``make`` name fields as the CLI does.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any

import pytest
import typer

from pipeline.config import assign, leaves, make
from pipeline.errors import ConfigError
from pipeline.segment.config import SegmentConfig
from pipeline.train.config import TrainConfig

pytestmark = pytest.mark.unit

COMMANDS = {
    ("train",): TrainConfig,
    ("flow", "train"): TrainConfig,
    ("flow", "train-and-segment"): TrainConfig,
    ("schedule", "train"): TrainConfig,
    ("segment",): SegmentConfig,
    ("flow", "segment"): SegmentConfig,
}


def _command(path: tuple[str, ...]) -> Any:
    """The Click command of ``fcnpipe PATH`` (Typer's own Click: duck-typed)."""
    from flows.cli import app

    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    return command


@pytest.mark.parametrize("cls", [TrainConfig, SegmentConfig])
def test_every_field_is_documented(cls: type) -> None:
    undocumented = [leaf.dotted for leaf in leaves(cls) if not leaf.doc]
    assert not undocumented


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_every_field_is_an_option_of_every_command_that_takes_the_config(
    path: tuple[str, ...],
) -> None:
    params = {p.name for p in _command(path).params}
    for leaf in leaves(COMMANDS[path]):
        if leaf.option is not None:
            assert leaf.option in params, f"{' '.join(path)}: no option for {leaf.dotted}"
    assert "sets" in params


def _parsed(cls: type, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The configuration ``fcnpipe ARGV`` builds (the job function replaced by a catcher)."""
    import pipeline.segment.driver
    import pipeline.train.driver

    caught: dict[str, Any] = {}

    def catch(config: Any, **_: Any) -> None:
        caught["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(pipeline.train.driver, "train", catch)
    monkeypatch.setattr(pipeline.segment.driver, "segment", catch)
    monkeypatch.setattr("ray.data.DataContext.get_current", lambda: SimpleNamespace())
    # No output session: it would write a log file under the (relative) output root.
    monkeypatch.setattr(
        "flows.cli.jobs.job_output",
        lambda *args: contextlib.nullcontext(SimpleNamespace(echo=print)),
    )
    command = _command((argv[0],))
    with pytest.raises(SystemExit):
        command.main(args=argv[1:], prog_name="fcnpipe", standalone_mode=False)
    assert isinstance(caught["config"], cls)
    return caught["config"]


def test_given_options_override_defaults_and_set_reaches_nested_fields(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = _parsed(
        TrainConfig,
        [
            "train", "s3://b/data", "-o", "s3://b/out", "--model", "fcn16s", "--epochs", "3",
            "--no-hflip", "--scale-range", "1", "1", "--val-split", "", "--layout", "voc",
            "--s3-endpoint", "http://127.0.0.1:9000",
            "--set", "data.read.storage.retry.max_attempts=2", "--set", "lr=0.05",
        ],
        monkeypatch,
    )  # fmt: skip
    expected = make(
        TrainConfig,
        dataset_uri="s3://b/data",
        output_uri="s3://b/out",
        head="fcn16s",
        epochs=3,
        hflip=False,
        scale_range=(1.0, 1.0),
        val_split=None,
        layout="voc",
        s3_endpoint="http://127.0.0.1:9000",
        lr=0.05,
    )
    assert config.data.read.storage.retry.max_attempts == 2
    config_fields = {leaf.dotted for leaf in leaves(TrainConfig)} - {
        "data.read.storage.retry.max_attempts"
    }
    for dotted in config_fields:
        got, want = config, expected
        for part in dotted.split("."):
            got, want = getattr(got, part), getattr(want, part)
        assert got == want, dotted


def test_segment_options(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _parsed(
        SegmentConfig,
        ["segment", "in/", "-m", "models/r", "-o", "out", "--actors", "3", "--batch-size", "2",
         "--resize", "512", "--palette", "--rows-per-file", "10"],
        monkeypatch,
    )  # fmt: skip
    assert (config.input_uri, config.model_uri, config.output_uri) == ("in/", "models/r", "out")
    assert (config.scaling.actors, config.scaling.batch_size) == (3, 2)
    assert (config.data.resize, config.output.palette, config.output.rows_per_file) == (
        512,
        True,
        10,
    )
    assert config.scaling.threads_per_actor == "auto"  # not given: the dataclass's default
    assert config.scaling.use_gpu is None


def test_assignments_by_path_or_unique_name() -> None:
    data = assign(TrainConfig, {}, ["epochs=4", "data.read.layout=voc", "scale_range=[1, 2]"])
    assert data == {
        "optim": {"epochs": 4},
        "data": {"read": {"layout": "voc"}, "scale_range": [1, 2]},
    }
    with pytest.raises(ConfigError, match="expected FIELD=VALUE"):
        assign(TrainConfig, {}, ["epochs"])
    with pytest.raises(ConfigError, match="no field 'epoch'"):
        assign(TrainConfig, {}, ["epoch=3"])
