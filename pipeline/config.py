"""Job configurations: frozen, validated, nested dataclasses; one surface for every entry point.

A job's configuration (:class:`pipeline.train.config.TrainConfig`,
:class:`pipeline.segment.config.SegmentConfig`) is a frozen dataclass whose sections (model,
data, optim, scaling, ...) are frozen dataclasses too, as torchtitan's ``JobConfig`` is. Every
field carries a one-line docstring, and every section rejects contradictory values in its
``__post_init__`` with a :class:`~pipeline.errors.ConfigError`. The same object travels
everywhere: the CLI generates one option per field from the dataclasses and their docstrings
(``flows/cli/options.py``), the Prefect flows take it as a typed parameter, and Ray Jobs carry
it as JSON. So a new field is one edit, in its section.

The helpers:

- :func:`leaves`: every field of a configuration, nested ones included, with its dotted path,
  type, default, docstring and CLI option name;
- :func:`build`, :func:`dump`, :func:`to_json`, :func:`from_json`: a configuration from JSON
  values and back, checked by the dataclasses' own validation (pydantic drives it; an unknown
  field is an error, not silently dropped);
- :func:`assign`: ``FIELD=VALUE`` assignments (the CLI's ``--set``) by dotted path or by a
  field name that is unique in the configuration.

A field's ``metadata`` may hold ``cli``: another option name (``"model"`` for ``model.head``),
or ``False`` to leave it (and, on a section, all its fields) to ``--set``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pipeline.errors import ConfigError

__all__ = [
    "FORBID",
    "Leaf",
    "assign",
    "build",
    "check_choice",
    "dump",
    "evolve",
    "field_docs",
    "from_json",
    "leaves",
    "make",
    "optional_of",
    "to_json",
]

T = TypeVar("T")

FORBID: dict[str, str] = {"extra": "forbid"}
"""``__pydantic_config__`` of every configuration dataclass: read from JSON (flow parameters,
Ray Jobs) by pydantic, an unknown field is an error, not silently dropped. (A plain dict, so the
configuration modules need no pydantic import.)"""


def check_choice(name: str, value: object, choices: tuple[object, ...]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices``.

    (Pydantic checks ``Literal`` fields read from JSON; a dataclass built in Python is not.)
    """
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written on the lines after the field.

    Read from the class's source (its bases' too); a field without one maps to ``""``.

    Args:
        cls: A dataclass.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (frozen app): no docs, still options
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, [*body[1:], None], strict=True):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@dataclass(frozen=True)
class Leaf:
    """One field of a configuration that is not itself a section."""

    path: tuple[str, ...]
    """Field names from the top, e.g. ``("optim", "lr")``."""
    type: Any
    """Its annotation, resolved (e.g. ``int | None``)."""
    default: Any
    """Its default (``dataclasses.MISSING`` where required)."""
    doc: str
    """Its docstring, on one line."""
    option: str | None
    """Its CLI option name (``lr``, ``model``), or None where only ``--set`` reaches it."""

    @property
    def name(self) -> str:
        """The field's own name."""
        return self.path[-1]

    @property
    def dotted(self) -> str:
        """The path with dots, as ``--set`` takes it."""
        return ".".join(self.path)


def _section_type(annotation: Any) -> type | None:
    """The dataclass a field holds, if it is a section (not ``X | None``)."""
    return (
        annotation
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation)
        else None
    )


@functools.cache
def leaves(cls: type) -> tuple[Leaf, ...]:
    """Every leaf field of a configuration class, depth first in declaration order.

    Args:
        cls: A configuration dataclass.
    """
    out: list[Leaf] = []

    def walk(klass: type, prefix: tuple[str, ...], cli: bool) -> None:
        hints = typing.get_type_hints(klass)
        docs = field_docs(klass)
        for f in dataclasses.fields(klass):
            if not f.init:
                continue
            annotation = hints[f.name]
            wanted = f.metadata.get("cli", True)
            section = _section_type(annotation)
            if section is not None:
                walk(section, (*prefix, f.name), cli and wanted is not False)
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = dataclasses.MISSING
            option = None
            if cli and wanted is not False:
                option = wanted if isinstance(wanted, str) else f.name
            out.append(Leaf((*prefix, f.name), annotation, default, docs.get(f.name, ""), option))

    walk(cls, (), True)
    options = [leaf.option for leaf in out if leaf.option]
    clashes = sorted({o for o in options if options.count(o) > 1})
    if clashes:  # a programming error: caught by the tests of every configuration
        raise TypeError(f"{cls.__name__}: CLI option names repeat: {clashes}")
    return tuple(out)


def _adapter(cls: type) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(cls)


def _problems(exc: Exception) -> str:
    """A pydantic ValidationError on one line: ``path: message; ...``."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        return str(exc)
    parts = []
    for error in errors():
        where = ".".join(str(p) for p in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if error.get("type") in ("literal_error", "int_parsing", "float_parsing", "bool_parsing"):
            message += f" (got {error.get('input')!r})"
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def build(cls: type[T], data: Mapping[str, Any]) -> T:
    """A configuration from a nested dict of JSON values (sections as dicts), checked.

    Args:
        cls: The configuration class.
        data: Field values; missing ones take their defaults.

    Raises:
        ConfigError: An unknown field, a wrong type or an invalid value (every problem, with
            its dotted path, on one line).
    """
    from pydantic import ValidationError

    try:
        config: T = _adapter(cls).validate_python(dict(data))
    except ValidationError as exc:
        raise ConfigError(f"invalid {cls.__name__}: {_problems(exc)}") from None
    return config


def dump(config: Any) -> dict[str, Any]:
    """A configuration as a nested dict of JSON values (every field, defaults included)."""
    result: dict[str, Any] = _adapter(type(config)).dump_python(config, mode="json")
    return result


def to_json(config: Any) -> str:
    """A configuration as JSON (every field, defaults included)."""
    return json.dumps(dump(config))


def from_json(cls: type[T], text: str) -> T:
    """The configuration a JSON text describes (see :func:`build`).

    Raises:
        ConfigError: Not JSON, or not a valid configuration of ``cls``.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"invalid {cls.__name__}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"invalid {cls.__name__}: expected a JSON object")
    return build(cls, data)


def _resolve_key(cls: type, key: str, value: Any = None) -> tuple[str, ...]:
    """The path of ``key``: a dotted path, a top-level field, or a unique field name (or CLI
    option name: ``model`` is ``model.head`` unless the value is a whole section)."""
    path = tuple(key.split("."))
    if len(path) > 1:
        return path
    sections = {
        f.name for f in dataclasses.fields(cls) if _section_type(typing.get_type_hints(cls)[f.name])
    }
    aliases = [leaf.path for leaf in leaves(cls) if leaf.option == key != leaf.name]
    if key in sections and aliases and not isinstance(value, Mapping):
        return aliases[0]
    if key in {f.name for f in dataclasses.fields(cls)}:
        return path
    found = [leaf.path for leaf in leaves(cls) if key in (leaf.name, leaf.option)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConfigError(
            f"{cls.__name__} has no field {key!r} (fields: "
            f"{', '.join(leaf.dotted for leaf in leaves(cls))})"
        )
    raise ConfigError(
        f"several fields of {cls.__name__} are named {key!r}; give the path: "
        + ", ".join(".".join(p) for p in found)
    )


def assign(cls: type, data: dict[str, Any], items: Iterable[str]) -> dict[str, Any]:
    """Apply ``FIELD=VALUE`` assignments to a nested dict of field values, in place.

    ``FIELD`` is a dotted path (``optim.lr``, ``data.read.layout``) or the name of a field
    that is unique in the configuration (``lr``, ``epochs``); ``VALUE`` is JSON, else a
    string (``--set layout=voc``).

    Args:
        cls: The configuration class.
        data: The values so far (sections as dicts); changed and returned.
        items: The assignments.

    Raises:
        ConfigError: Not ``FIELD=VALUE``, or no such field.
    """
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set epochs=4")
        try:
            value: Any = json.loads(text)
        except json.JSONDecodeError:
            value = text
        try:
            *parents, leaf = _resolve_key(cls, key.strip(), value)
        except ConfigError as exc:
            raise ConfigError(f"--set {item}: {exc}") from None
        target = data
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {item!r}: {parent} is not a section")
        target[leaf] = value
    return data


def make(cls: type[T], **fields: Any) -> T:
    """A configuration from field values by name: top-level fields, dotted paths written with
    ``__`` (``optim__lr``), or field names unique in the configuration (``lr``, ``epochs``).

    The flat form the CLI takes, for code and tests: ``make(TrainConfig, dataset_uri=...,
    output_uri=..., epochs=2, lr=1e-3)``.

    Raises:
        ConfigError: No such field, or an invalid configuration.
    """
    data: dict[str, Any] = {}
    for key, value in fields.items():
        *parents, leaf = _resolve_key(cls, key.replace("__", "."), value)
        target = data
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return build(cls, data)


def evolve(config: T, **fields: Any) -> T:
    """A copy of a configuration with fields changed, named as :func:`make` names them."""
    cls = type(config)
    data: dict[str, Any] = _adapter(cls).dump_python(config)
    for key, value in fields.items():
        *parents, leaf = _resolve_key(cls, key.replace("__", "."), value)
        target = data
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return build(cls, data)


def optional_of(annotation: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, else ``(annotation, False)``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False
