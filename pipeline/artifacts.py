"""Model artifacts: the weights and model card that training writes and inference loads.

An artifact is a directory ``OUT/models/<run_id>/`` (see :func:`model_uri`) holding

- ``model.safetensors``: the state dict (safetensors: no pickle), or ``model.pt``, a
  ``torch.save`` state dict read back with ``torch.load(weights_only=True)`` only;
- ``model.json``: the :class:`ModelCard` (architecture, backbone, classes, builder options,
  input normalization, training config, final validation metrics, dataset, library
  versions, the weights' file name and SHA-256).

:func:`save_model` writes the weights first and the card last, each atomically (see
``pipeline.storage.write_bytes``), and removes an earlier card before anything else: an
artifact without a card is one whose save did not finish, and loading it fails with
:class:`ArtifactNotFound`. The card's SHA-256 of the weights catches weights that were
corrupted or overwritten after the card.

Loading rebuilds the module from the card on the ``meta`` device (no time spent
initialising weights that are replaced at once, which matters for VGG16's 134M), checks every
key and shape against the weights, naming the first that differs, then assigns the loaded
tensors. FCN models share no tensors between state-dict entries (checked for every head and
backbone), which safetensors requires; :func:`export_state_dict_bytes` copies any that
would, for other modules.

Cards never hold credentials: they carry no storage options (a ``StorageOptions`` in a
training config is left out), and :func:`save_model` refuses a card whose JSON contains the
value of an AWS credential variable set in the environment.

Example::

    uri = save_model(model, card, model_uri("s3://out", run_id))
    model = load_model(uri, device="cuda")          # eval mode
    model, card = load_artifact(uri)                # the card too, read once
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from datetime import UTC, datetime
from enum import Enum
from importlib import metadata
from itertools import chain
from pathlib import PurePath
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

import numpy as np
import safetensors.torch
import torch
from torch import Tensor, nn

from fcn.metrics import nan_to_none
from fcn.models import BACKBONES, FCN, HEADS, build_model
from fcn.transforms import Normalization
from pipeline import storage
from pipeline.errors import ConfigError, InputError
from pipeline.storage import StorageOptions
from pipeline.tables import validate_run_id

__all__ = [
    "CARD_FILE",
    "CARD_FORMAT_VERSION",
    "ONNX_FILE",
    "SECRET_VARIABLES",
    "WEIGHTS_FILES",
    "ArtifactError",
    "ArtifactNotFound",
    "ModelCard",
    "WeightsFormat",
    "check_no_secrets",
    "export_state_dict_bytes",
    "library_versions",
    "load_artifact",
    "load_card",
    "load_model",
    "model_uri",
    "save_model",
    "write_card",
]

CARD_FILE = "model.json"
"""Name of the model card inside an artifact directory."""

CARD_FORMAT_VERSION = 1
"""Version of the card's JSON layout; a loader refuses cards with a newer one."""

WeightsFormat = Literal["safetensors", "torch"]
"""How the state dict is stored: safetensors, or ``torch.save`` (read with weights_only)."""

WEIGHTS_FILES: dict[str, str] = {"safetensors": "model.safetensors", "torch": "model.pt"}
"""File name of the weights in each format, in the order a loader looks for them."""

ONNX_FILE = "model.onnx"
"""File name of the artifact's ONNX export (``pipeline.export``)."""

SECRET_VARIABLES: tuple[str, ...] = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
)
"""Environment variables whose values must never appear in a card."""

_MIN_SECRET_LENGTH = 8  # shorter values are no real credential and would match by chance
_MODEL_OPTIONS = ("dropout", "learn_upsample")  # builder options besides the backbone
_SHA256 = re.compile(r"[0-9a-f]{64}")
_LIBRARIES = ("torch", "torchvision", "numpy", "safetensors", "fcnpipe")


class ArtifactError(InputError):
    """A model artifact that cannot be loaded: incomplete, corrupted or inconsistent.

    Messages name the artifact's URI. Storage failures (``pipeline.storage.StorageError``)
    pass through as they are.
    """


class ArtifactNotFound(ArtifactError):
    """No model card: no artifact at this URI, or one whose save did not finish."""


def library_versions() -> dict[str, str]:
    """Versions of python and of the libraries that define what a saved model means."""
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    versions["torch"] = torch.__version__  # with the build suffix, e.g. 2.14.0+cpu
    return versions


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def model_uri(out_uri: str, run_id: str) -> str:
    """The artifact directory of a run: ``OUT/models/<run_id>``.

    Args:
        out_uri: The output root ``OUT`` (any URI ``pipeline.storage`` accepts).
        run_id: The run's id.
    """
    validate_run_id(run_id)
    return storage.join(out_uri, "models", run_id)


def _card_json(value: Any, where: str) -> Any:
    """``value`` as plain JSON data: dataclasses, paths, enums, tuples, numpy scalars converted.

    ``StorageOptions`` values are left out of mappings and dataclasses: cards carry none.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value} is not valid JSON")
        return value
    if isinstance(value, np.generic):
        return _card_json(value.item(), where)
    if isinstance(value, Enum):
        return _card_json(value.value, where)
    if isinstance(value, PurePath):
        return str(value)
    if is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in fields(value)}
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: keys must be strings, got {key!r}")
            if not isinstance(item, StorageOptions):
                out[key] = _card_json(item, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [_card_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise ValueError(f"{where}: a {type(value).__name__} is not JSON data")


def _metric_number(value: Any, where: str) -> float | int:
    if value is None:  # how JSON spells NaN
        return math.nan
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where} must be a number or None (NaN), got {value!r}")
    if isinstance(value, float) and math.isinf(value):
        raise ValueError(f"{where} is infinite")
    return value


def _metric(value: Any, name: str, num_classes: int) -> float | int | list[float | int]:
    if isinstance(value, np.ndarray | Tensor):
        value = value.tolist()
    if isinstance(value, list | tuple):
        if len(value) != num_classes:
            raise ValueError(
                f"metrics[{name!r}] has {len(value)} entries; per-class metrics need one per "
                f"class ({num_classes})"
            )
        return [_metric_number(v, f"metrics[{name!r}][{i}]") for i, v in enumerate(value)]
    return _metric_number(value, f"metrics[{name!r}]")


def _check_uri(uri: str | None, name: str) -> None:
    if uri is None:
        return
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"{name} must be a non-empty string or None, got {uri!r}")
    if "@" in urlsplit(uri).netloc:
        # Never echo it: user info may hold a password.
        raise ValueError(f"{name} must not hold user:password@ (value not shown)")


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    """What a saved model is and how it was made: ``model.json`` of an artifact.

    Dicts are normalised to plain JSON data on construction, so a card equals its
    :meth:`from_json` round trip (up to NaN metrics, which never compare equal).
    """

    run_id: str
    """Id of the training run that made the model."""
    created_at: str = field(default_factory=_utc_now)
    """When the card was made: ISO 8601 with a UTC offset."""
    architecture: str
    """FCN head: one of ``fcn.models.HEADS`` (``fcn32s``, ``fcn16s``, ``fcn8s``)."""
    backbone: str
    """Backbone: one of ``fcn.models.BACKBONES``."""
    num_classes: int
    """Number of output classes."""
    class_names: list[str]
    """Name of each class, index = class id; ``num_classes`` of them."""
    model_options: dict[str, Any] = field(default_factory=dict)
    """Builder options besides the backbone (``dropout``, ``learn_upsample``); the loader
    rebuilds the module with them."""
    normalization: dict[str, Any]
    """Input normalization, as ``fcn.transforms.describe_normalization`` gives it."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Final validation metrics (``pixel_acc``, ``mean_acc``, ``mean_iou``, ``fw_iou``, and
    per-class lists such as ``iou``): numbers, NaN written as JSON null and read back as NaN."""
    training_config: dict[str, Any] = field(default_factory=dict)
    """The training job's configuration as JSON data (dataclasses are converted; storage
    options are left out)."""
    dataset_uri: str | None = None
    """URI of the training dataset (root or manifest)."""
    manifest_hash: str | None = None
    """``pipeline.data.layouts.manifest_hash`` of the training manifest."""
    parent_model_uri: str | None = None
    """Artifact this model was initialised from (staged training, e.g. FCN-16s from 32s)."""
    weights_file: str | None = None
    """File of the weights in the artifact (one of ``WEIGHTS_FILES``); set by save_model."""
    weights_sha256: str | None = None
    """SHA-256 (hex) of the weights file; set by save_model, checked by the loader."""
    library_versions: dict[str, str] = field(default_factory=library_versions)
    """Versions of python, torch, torchvision, numpy, safetensors and fcnpipe at save time."""
    onnx: dict[str, Any] | None = None
    """The artifact's ONNX export (``pipeline.export``), once made: ``file``, ``opset``,
    ``sha256`` (checked before a session loads it), ``input`` and ``outputs`` specs,
    ``exported_at``, ``exporter``."""

    def __post_init__(self) -> None:
        if self.architecture not in HEADS:
            raise ValueError(
                f"unknown architecture {self.architecture!r}; expected one of {', '.join(HEADS)}"
            )
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"unknown backbone {self.backbone!r}; expected one of {', '.join(BACKBONES)}"
            )
        n = self.num_classes
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {n!r}")
        names = self.class_names
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise ValueError(f"class_names must be a list of strings, got {names!r}")
        if not all(isinstance(name, str) and name for name in names):
            raise ValueError(f"class_names must be non-empty strings, got {names!r}")
        if len(names) != n:
            raise ValueError(f"{len(names)} class_names for num_classes={n}")
        object.__setattr__(self, "class_names", list(names))
        self._set_normalization()
        self._set_model_options()
        object.__setattr__(
            self, "training_config", self._mapping(self.training_config, "training_config")
        )
        metrics = self._mapping_of(self.metrics, "metrics")
        object.__setattr__(self, "metrics", {k: _metric(v, k, n) for k, v in metrics.items()})
        validate_run_id(self.run_id)
        _check_uri(self.dataset_uri, "dataset_uri")
        _check_uri(self.parent_model_uri, "parent_model_uri")
        if self.manifest_hash is not None and (
            not isinstance(self.manifest_hash, str) or not self.manifest_hash
        ):
            raise ValueError("manifest_hash must be a non-empty string or None")
        versions = self._mapping_of(self.library_versions, "library_versions")
        if not all(isinstance(v, str) for v in versions.values()):
            raise ValueError(f"library_versions must map names to strings, got {versions!r}")
        object.__setattr__(self, "library_versions", dict(versions))
        try:
            created = datetime.fromisoformat(self.created_at)
        except (TypeError, ValueError):
            created = None
        if created is None or created.utcoffset() is None:
            raise ValueError(f"created_at must be ISO 8601 with a UTC offset: {self.created_at!r}")
        if self.weights_file is not None and self.weights_file not in WEIGHTS_FILES.values():
            raise ValueError(
                f"weights_file must be one of {', '.join(WEIGHTS_FILES.values())}, got "
                f"{self.weights_file!r}"
            )
        if self.weights_sha256 is not None and not (
            isinstance(self.weights_sha256, str) and _SHA256.fullmatch(self.weights_sha256)
        ):
            raise ValueError("weights_sha256 must be 64 lowercase hex digits or None")
        if self.onnx is not None:
            onnx = self._mapping(self.onnx, "onnx")
            if onnx.get("file") != ONNX_FILE or not _SHA256.fullmatch(str(onnx.get("sha256"))):
                raise ValueError(f"onnx must name {ONNX_FILE} and its sha256, got {onnx!r}")
            object.__setattr__(self, "onnx", onnx)

    @staticmethod
    def _mapping_of(value: Any, name: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise ValueError(f"{name} must be a mapping, got {type(value).__name__}")
        return value

    @classmethod
    def _mapping(cls, value: Any, name: str) -> dict[str, Any]:
        data: dict[str, Any] = _card_json(cls._mapping_of(value, name), name)
        return data

    def _set_normalization(self) -> None:
        normalization = self._mapping(self.normalization, "normalization")
        if normalization.get("name") not in get_args(Normalization):
            raise ValueError(
                f"normalization must be a describe_normalization() dict with a name in "
                f"{get_args(Normalization)}, got {normalization!r}"
            )
        object.__setattr__(self, "normalization", normalization)

    def _set_model_options(self) -> None:
        options = self._mapping(self.model_options, "model_options")
        backbone = options.pop("backbone", self.backbone)
        if backbone != self.backbone:
            raise ValueError(
                f"model_options backbone={backbone!r} contradicts backbone={self.backbone!r}"
            )
        unknown = sorted(set(options) - set(_MODEL_OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown model_options {unknown}; builder options are {', '.join(_MODEL_OPTIONS)}"
            )
        object.__setattr__(self, "model_options", options)

    @property
    def normalization_name(self) -> Normalization:
        """The input normalization's name, for ``fcn.transforms.eval_transform``."""
        name: Normalization = self.normalization["name"]
        return name

    def to_json(self) -> str:
        """The card as JSON text, ``format_version`` first; NaN metrics become null."""
        data: dict[str, Any] = {"format_version": CARD_FORMAT_VERSION}
        for f in fields(self):
            data[f.name] = getattr(self, f.name)
        data["metrics"] = nan_to_none(dict(self.metrics))
        return json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelCard:
        """Parse a card written by :meth:`to_json`.

        Args:
            text: The JSON text.

        Raises:
            ValueError: Not JSON, a newer format version, missing or unknown fields, or a
                field that fails validation.
        """
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a model card: invalid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"not a model card: a JSON {type(data).__name__}, not an object")
        version = data.pop("format_version", None)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"not a model card: format_version is {version!r}")
        if version > CARD_FORMAT_VERSION:
            raise ValueError(
                f"card format_version {version} is newer than this fcnpipe reads "
                f"({CARD_FORMAT_VERSION}); upgrade fcnpipe"
            )
        names = {f.name for f in fields(cls)}
        required = {
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        }
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"model card lacks field(s) {', '.join(missing)}")
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"model card has unknown field(s) {', '.join(unknown)}")
        return cls(**data)


def check_no_secrets(text: str) -> None:
    """Refuse text holding the value of an AWS credential variable (``SECRET_VARIABLES``).

    Args:
        text: What is about to be written, e.g. a card's JSON.

    Raises:
        ValueError: A credential's value occurs in ``text``; the message names the
            variable, never the value.
    """
    for name in SECRET_VARIABLES:
        secret = os.environ.get(name, "")
        if len(secret) < _MIN_SECRET_LENGTH:
            continue
        escaped = json.dumps(secret, ensure_ascii=False)[1:-1]
        if secret in text or escaped in text:
            raise ConfigError(
                f"refusing to write a model card holding the value of {name} (not shown); "
                f"remove credentials from the training config"
            )


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
            continue
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
            continue
        return model


def export_state_dict_bytes(
    model: nn.Module, weights_format: WeightsFormat = "safetensors"
) -> bytes:
    """A module's state dict as the bytes of a weights file, on the CPU.

    safetensors refuses tensors sharing memory and stores only contiguous ones: a tensor
    that is a view, non-contiguous or shares storage with an earlier entry is copied
    (FCN models have none). Wrappers (DDP, ``torch.compile``) are looked through.

    Args:
        model: The module.
        weights_format: ``"safetensors"`` or ``"torch"`` (``torch.save`` of the state dict).
    """
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in _unwrap(model).state_dict().items():
        tensor = value.detach().to("cpu")
        pointer = tensor.untyped_storage().data_ptr()
        if (
            not tensor.is_contiguous()
            or tensor.untyped_storage().nbytes() != tensor.nbytes
            or (tensor.numel() and pointer in seen)
        ):
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        if tensor.numel():
            seen.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    if weights_format == "safetensors":
        return safetensors.torch.save(tensors, metadata={"format": "pt"})
    if weights_format == "torch":
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        return buffer.getvalue()
    raise ValueError(
        f"weights_format must be one of {', '.join(WEIGHTS_FILES)}, got {weights_format!r}"
    )


def _build_empty(card: ModelCard) -> FCN:
    """The card's module on the meta device: structure only, no memory, no init time."""
    with torch.device("meta"):
        return build_model(
            card.architecture, card.num_classes, backbone=card.backbone, **card.model_options
        )


def _first_mismatch(expected: Mapping[str, Tensor], actual: Mapping[str, Any]) -> str | None:
    """The first key (in ``expected``'s order) that is missing or differs in shape, described."""
    for key, ref in expected.items():
        if key not in actual:
            return f"key {key!r} (shape {tuple(ref.shape)}) is missing"
        got = actual[key]
        if not isinstance(got, Tensor):
            return f"key {key!r} is a {type(got).__name__}, not a tensor"
        if got.shape != ref.shape:
            return f"key {key!r} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if got.dtype != ref.dtype and not (got.is_floating_point() and ref.is_floating_point()):
            return f"key {key!r} has dtype {got.dtype}, expected {ref.dtype}"
    extra = [key for key in actual if key not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        return f"unexpected key {extra[0]!r}{more}"
    return None


def _describe(card: ModelCard) -> str:
    return f"{card.architecture} with a {card.backbone} backbone and {card.num_classes} classes"


def save_model(
    model: nn.Module,
    card: ModelCard,
    uri: str | storage.Location,
    options: StorageOptions | None = None,
    *,
    weights_format: WeightsFormat = "safetensors",
) -> str:
    """Write a model artifact: the weights, then the card (last, so a torn save never loads).

    The card must describe the model: its architecture, backbone and options rebuild a
    module with exactly the model's state-dict keys and shapes (checked before anything is
    written). An earlier artifact at ``uri`` is replaced; its card is removed first.

    Args:
        model: The trained FCN (DDP / ``torch.compile`` wrappers are looked through).
        card: Its card; ``weights_file`` and ``weights_sha256`` are filled in here.
        uri: The artifact directory, usually ``model_uri(out_uri, run_id)`` (or a Location).
        options: Storage options.
        weights_format: ``"safetensors"`` (default) or ``"torch"``.

    Returns:
        The artifact's canonical URI.

    Raises:
        ValueError: The card does not describe the model, or holds a credential.
    """
    if weights_format not in WEIGHTS_FILES:
        raise ValueError(
            f"weights_format must be one of {', '.join(WEIGHTS_FILES)}, got {weights_format!r}"
        )
    inner = _unwrap(model)
    for attribute, name in (
        ("head_name", "architecture"),
        ("backbone_name", "backbone"),
        ("num_classes", "num_classes"),
    ):
        value = getattr(inner, attribute, getattr(card, name))
        if value != getattr(card, name):
            raise ValueError(f"card {name}={getattr(card, name)!r} but the model's is {value!r}")
    mismatch = _first_mismatch(_build_empty(card).state_dict(), inner.state_dict())
    if mismatch:
        raise ValueError(
            f"the card ({_describe(card)}, options {card.model_options}) does not describe "
            f"this model: {mismatch}"
        )
    data = export_state_dict_bytes(inner, weights_format)
    weights_file = WEIGHTS_FILES[weights_format]
    card = replace(card, weights_file=weights_file, weights_sha256=hashlib.sha256(data).hexdigest())
    text = card.to_json()
    check_no_secrets(text)
    root = storage.resolve(uri, options)
    # Without a card the directory reads as an unfinished artifact until the new one lands.
    storage.delete(root.join(CARD_FILE))
    for stale in WEIGHTS_FILES.values():
        if stale != weights_file:
            storage.delete(root.join(stale))
    storage.write_bytes(root.join(weights_file), data)
    storage.write_bytes(root.join(CARD_FILE), text.encode())
    return root.uri


def write_card(
    card: ModelCard, uri: str | storage.Location, options: StorageOptions | None = None
) -> None:
    """Replace an artifact's card (one atomic write), e.g. to record its ONNX export.

    Raises:
        ConfigError: The card would hold a credential.
    """
    text = card.to_json()
    check_no_secrets(text)
    storage.write_bytes(storage.resolve(uri, options).join(CARD_FILE), text.encode())


def load_card(uri: str | storage.Location, options: StorageOptions | None = None) -> ModelCard:
    """Read an artifact's model card.

    Args:
        uri: The artifact directory (a URI, or a Location to reuse its connection).
        options: Storage options.

    Raises:
        ArtifactNotFound: No card (no artifact, or an unfinished save).
        ArtifactError: The card is not valid.
    """
    location = storage.resolve(uri, options).join(CARD_FILE)
    try:
        text = storage.read_bytes(location)
    except FileNotFoundError:
        raise ArtifactNotFound(
            f"no model card at {location.uri}: no model artifact at {uri!s}, or one whose save "
            f"did not finish (the card is written last)"
        ) from None
    try:
        return ModelCard.from_json(text)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"invalid model card {location.uri}: {exc}") from None


def _read_state_dict(root: storage.Location, card: ModelCard) -> dict[str, Tensor]:
    """The weights named by the card (or, without a name, the first file present)."""
    if card.weights_file is not None:
        name = card.weights_file
    else:
        found = [n for n in WEIGHTS_FILES.values() if storage.exists(root.join(n))]
        if not found:
            raise ArtifactError(
                f"no weights in {root.uri}: expected one of {', '.join(WEIGHTS_FILES.values())}"
            )
        name = found[0]
    location = root.join(name)
    try:
        data = storage.read_bytes(location)
    except FileNotFoundError:
        raise ArtifactError(f"the weights {location.uri} named by the card are missing") from None
    if card.weights_sha256 is not None and hashlib.sha256(data).hexdigest() != card.weights_sha256:
        raise ArtifactError(
            f"the weights {location.uri} do not match the card's SHA-256: corrupted, or "
            f"overwritten after the card was written"
        )
    try:
        if name == WEIGHTS_FILES["safetensors"]:
            state: Any = safetensors.torch.load(data)
        else:
            # weights_only: tensors and plain containers only, never arbitrary pickles.
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # each format has its own errors; all mean "not readable"
        raise ArtifactError(
            f"cannot read the weights {location.uri}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise ArtifactError(
            f"the weights {location.uri} hold a {type(state).__name__}, not a state dict"
        )
    return dict(state)


def load_artifact(
    uri: str | storage.Location,
    *,
    device: str | torch.device = "cpu",
    options: StorageOptions | None = None,
) -> tuple[FCN, ModelCard]:
    """Load a model artifact: the module, in eval mode on ``device``, and its card.

    Args:
        uri: The artifact directory (a URI or a Location).
        device: Where to put the module.
        options: Storage options.

    Raises:
        ArtifactNotFound: No card (no artifact, or an unfinished save).
        ArtifactError: Invalid card, unreadable or corrupted weights, or weights that do not
            fit the card's model (the message names the first key that differs).
    """
    root = storage.resolve(uri, options)  # once: each resolve opens a new S3 session
    card = load_card(root)
    state = _read_state_dict(root, card)
    try:
        model = _build_empty(card)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"the card of {root.uri} does not build a model: {exc}") from None
    expected = model.state_dict()
    mismatch = _first_mismatch(expected, state)
    if mismatch:
        raise ArtifactError(
            f"the weights of {root.uri} do not fit the card's model ({_describe(card)}): {mismatch}"
        )
    state = {key: value.to(expected[key].dtype) for key, value in state.items()}
    tied = len(list(model.named_parameters(remove_duplicate=False))) != len(
        list(model.named_parameters())
    )
    if tied:  # assigning would untie shared parameters: build for real and copy instead
        model = build_model(
            card.architecture, card.num_classes, backbone=card.backbone, **card.model_options
        )
    try:
        model.load_state_dict(state, strict=True, assign=not tied)
    except RuntimeError as exc:
        raise ArtifactError(f"cannot load the weights of {root.uri}: {exc}") from exc
    leftover = [
        name for name, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta
    ]
    if leftover:
        raise ArtifactError(
            f"the weights of {root.uri} leave {leftover[0]!r} unset (not in the state dict)"
        )
    if model.num_classes != card.num_classes:
        raise ArtifactError(
            f"{root.uri}: the model has {model.num_classes} classes, the card {card.num_classes}"
        )
    return model.to(device).eval(), card


def load_model(
    uri: str | storage.Location,
    *,
    device: str | torch.device = "cpu",
    options: StorageOptions | None = None,
) -> FCN:
    """Load a model artifact as a ready module in eval mode on ``device``.

    Use :func:`load_artifact` to get the card as well, or :func:`load_card` for it alone.

    Args:
        uri: The artifact directory (a URI or a Location).
        device: Where to put the module.
        options: Storage options.

    Raises:
        ArtifactNotFound, ArtifactError: See :func:`load_artifact`.
    """
    model, _ = load_artifact(uri, device=device, options=options)
    return model
