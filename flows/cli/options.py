"""CLI options generated from a job configuration's fields and their docstrings.

:func:`config_command` turns a configuration dataclass (``TrainConfig``, ``SegmentConfig``)
into a Typer command: one option per field (``--epochs``, ``--lr``, ``--layout``; a field's
``metadata["cli"]`` renames it or leaves it out), its help the field's docstring and its
default the dataclass's, plus ``--set FIELD=VALUE`` for every field (nested ones by dotted
path). Only the options given on the command line are applied; the dataclass supplies the
rest, so defaults live in one place. The command receives the built, validated configuration.
A new field of a configuration is a new option of every command that takes it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any

import typer

from pipeline.config import Leaf, assign, build, leaves, optional_of

__all__ = ["Sets", "config_command", "config_options"]

Sets = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Any configuration field, FIELD=VALUE (VALUE as JSON, else a string); repeatable. "
        "FIELD is a dotted path (data.read.layout) or a field name (epochs).",
        rich_help_panel="Configuration",
    ),
]


def _default_text(leaf: Leaf) -> str:
    if leaf.default is dataclasses.MISSING or leaf.default is None:
        return ""
    value = leaf.default
    if isinstance(value, tuple):
        value = " ".join(str(v) for v in value)
    elif isinstance(value, enum.Enum):
        value = value.value
    return f" (default: {value})"


def _plain(doc: str) -> str:
    """A field docstring as help text: no reST literals, no Rich markup."""
    from rich.markup import escape

    return escape(doc.replace("``", ""))


def _or_auto(annotation: Any) -> type | None:
    """``X`` for ``X | Literal["auto"]`` (a number or ``auto``), else None."""
    if typing.get_origin(annotation) is not typing.Union and not isinstance(
        annotation, types.UnionType
    ):
        return None
    args = typing.get_args(annotation)
    auto = [
        a
        for a in args
        if typing.get_origin(a) is typing.Literal and typing.get_args(a) == ("auto",)
    ]
    rest = [a for a in args if a not in auto]
    if len(auto) == 1 and len(rest) == 1 and isinstance(rest[0], type):
        return rest[0]
    return None


def _option(leaf: Leaf, decls: Sequence[str] | None, panel: str) -> inspect.Parameter:
    """The Typer parameter of one field: ``--name VALUE``, ``--flag/--no-flag`` for booleans."""
    base, _ = optional_of(leaf.type)
    metavar = None
    number = _or_auto(base)
    if number is not None:
        # ``--actors 3`` or ``--actors auto``: the configuration's validation reads the string.
        metavar, base = f"{number.__name__.upper()}|auto", str
    elif typing.get_origin(base) is typing.Literal:
        # A plain string for Click: a value outside the choices is then one line from the
        # configuration's own check, like every other bad value, not a usage panel.
        metavar = "|".join(str(choice) for choice in typing.get_args(base))
        base = str
    name = leaf.option or leaf.name
    flag = "--" + name.replace("_", "-")
    if base is bool:
        names = tuple(decls or (f"{flag}/--no-{flag[2:]}",))
    else:
        names = tuple(decls or (flag,))
    help_text = _plain(leaf.doc or leaf.dotted) + _default_text(leaf)
    info = typer.Option(
        *names, help=help_text, rich_help_panel=panel, show_default=False, metavar=metavar
    )
    required = leaf.default is dataclasses.MISSING
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=inspect.Parameter.empty if required else None,
        annotation=Annotated[base if required else base | None, info],
    )


def _argument(leaf: Leaf) -> inspect.Parameter:
    return inspect.Parameter(
        leaf.option or leaf.name,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Annotated[
            str,
            typer.Argument(help=_plain(leaf.doc), metavar=leaf.name.upper(), show_default=False),
        ],
    )


def _panel(leaf: Leaf) -> str:
    return "Job" if len(leaf.path) == 1 else leaf.path[0].capitalize()


def config_options(
    cls: type,
    *,
    arguments: Sequence[str] = (),
    names: Mapping[str, Sequence[str]] | None = None,
    skip: Sequence[str] = (),
) -> tuple[list[inspect.Parameter], Callable[..., Any]]:
    """The Typer parameters of ``cls``'s fields, and a function from their values to a config.

    Args:
        cls: The configuration class.
        arguments: Top-level fields taken as positional arguments, in order.
        names: Field path (dotted) -> option declarations, e.g. ``{"output_uri": ("--output",
            "-o")}``.
        skip: Field paths left out (set by the caller through the returned function's input).
    """
    names = dict(names or {})
    params: list[inspect.Parameter] = []
    used: list[Leaf] = []
    by_path = {leaf.dotted: leaf for leaf in leaves(cls)}
    for path in arguments:
        params.append(_argument(by_path[path]))
        used.append(by_path[path])
    for leaf in leaves(cls):
        if leaf.dotted in arguments or leaf.dotted in skip or leaf.option is None:
            continue
        params.append(_option(leaf, names.get(leaf.dotted), _panel(leaf)))
        used.append(leaf)
    params.append(
        inspect.Parameter("sets", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Sets)
    )

    def to_config(values: dict[str, Any], fixed: Mapping[str, Any] | None = None) -> Any:
        data: dict[str, Any] = {}
        for leaf in used:
            value = values.pop(leaf.option or leaf.name)
            if value is None:
                continue
            _, optional = optional_of(leaf.type)
            if optional and value == "" and leaf.type is not str:
                value = None  # ``--val-split ''``: explicitly none
            target = data
            for parent in leaf.path[:-1]:
                target = target.setdefault(parent, {})
            target[leaf.name] = list(value) if isinstance(value, tuple) else value
        for path, value in (fixed or {}).items():
            *parents, last = path.split(".")
            target = data
            for parent in parents:
                target = target.setdefault(parent, {})
            target[last] = value
        assign(cls, data, values.pop("sets") or ())
        return build(cls, data)

    return params, to_config


def config_command(
    typer_app: typer.Typer,
    name: str,
    cls: type,
    *,
    arguments: Sequence[str] = (),
    names: Mapping[str, Sequence[str]] | None = None,
    skip: Sequence[str] = (),
    fixed: Mapping[str, Any] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``func(config, **extras)`` as the command ``name`` of ``typer_app``.

    The command's parameters are the configuration's (see :func:`config_options`) followed by
    the keyword-only parameters of ``func`` after ``config`` (Typer-annotated as usual);
    ``fixed`` sets fields the command decides (dotted path -> value).

    Example::

        @config_command(app, "train", TrainConfig, arguments=["dataset_uri"],
                        names={"output_uri": ("--output", "-o")})
        def train(config: TrainConfig, *, num_cpus: Annotated[int | None, ...] = None) -> None:
            ...
    """

    def register(func: Callable[..., Any]) -> Callable[..., Any]:
        params, to_config = config_options(cls, arguments=arguments, names=names, skip=skip)
        extras = list(inspect.signature(func).parameters.values())[1:]
        hints = typing.get_type_hints(func, include_extras=True)
        extras = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in extras]
        clash = {p.name for p in params} & {p.name for p in extras}
        if clash:
            raise TypeError(f"{name}: options {sorted(clash)} are also configuration fields")

        @functools.wraps(func)
        def command(**values: Any) -> Any:
            extra_values = {p.name: values.pop(p.name) for p in extras}
            return func(to_config(values, fixed), **extra_values)

        command.__signature__ = inspect.Signature([*params, *extras])  # type: ignore[attr-defined]
        command.__annotations__ = {}
        del command.__wrapped__  # Typer must read the signature above, not func's
        typer_app.command(name)(command)
        return func

    return register
