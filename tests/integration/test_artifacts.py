"""pipeline.artifacts on the local filesystem and a real S3 server (SeaweedFS).

Tests taking ``storage_root`` run once per backend. Models: FCN-8s on resnet18 with 4 classes
(a smaller MobileNetV3 one for the failure paths), their weights perturbed so that every
tensor matters (score layers start at zero).
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field, replace
from itertools import chain
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fcn.metrics import ConfusionMatrix
from fcn.models import FCN, build_model
from fcn.transforms import describe_normalization
from pipeline import storage
from pipeline.artifacts import (
    CARD_FILE,
    CARD_FORMAT_VERSION,
    ArtifactError,
    ArtifactNotFound,
    ModelCard,
    export_state_dict_bytes,
    load_artifact,
    load_card,
    load_model,
    model_uri,
    save_model,
)
from pipeline.storage import Location, StorageOptions

pytestmark = pytest.mark.integration

NUM_CLASSES = 4
CLASS_NAMES = ["background", "circle", "square", "triangle"]
MANIFEST_HASH = "ab" * 32


@dataclass(frozen=True, kw_only=True)
class _TrainConfig:
    """Stands in for the training job's configuration."""

    lr: float = 1e-3
    epochs: int = 2
    crop: tuple[int, int] = (64, 64)
    storage: StorageOptions = field(default_factory=StorageOptions)


def _perturbed(model: FCN, seed: int) -> FCN:
    """``model`` with every parameter and buffer changed, so that all of them matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in chain(model.named_parameters(), model.named_buffers()):
            if not tensor.is_floating_point():
                tensor.fill_(7)  # BatchNorm's num_batches_tracked
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.mul_(1 + 0.1 * noise.abs())
            else:
                tensor.add_(0.05 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> FCN:
    """An FCN-8s on resnet18 with 4 classes and random weights."""
    torch.manual_seed(0)
    return _perturbed(build_model("fcn8s_resnet18", NUM_CLASSES), seed=1)


@pytest.fixture(scope="module")
def small() -> FCN:
    """An FCN-8s on MobileNetV3 (a quarter of resnet18's bytes) for the failure paths."""
    torch.manual_seed(5)
    return _perturbed(build_model("fcn8s_mobilenet_v3_large", NUM_CLASSES), seed=6)


@pytest.fixture
def root(storage_root: str) -> Location:
    """``storage_root`` resolved once: each resolve of an s3:// URI opens a new session."""
    return storage.resolve(storage_root)


def _metrics() -> dict[str, Any]:
    """Scores of a confusion matrix where class 1 is absent from truth and prediction."""
    matrix = ConfusionMatrix(NUM_CLASSES)
    target = torch.tensor([[0, 0, 2, 3], [0, 2, 2, 3]])
    pred = torch.tensor([[0, 2, 2, 3], [0, 2, 3, 3]])
    matrix.update(pred, target)
    return matrix.scores()


def _card(**changes: Any) -> ModelCard:
    fields: dict[str, Any] = {
        "run_id": "run-001",
        "architecture": "fcn8s",
        "backbone": "resnet18",
        "num_classes": NUM_CLASSES,
        "class_names": CLASS_NAMES,
        "normalization": describe_normalization("imagenet"),
        "metrics": _metrics(),
        "training_config": {"train": _TrainConfig(), "seed": 0},
        "dataset_uri": "s3://data/shapes/manifest.parquet",
        "manifest_hash": MANIFEST_HASH,
        "parent_model_uri": "s3://out/models/run-000",
    }
    fields.update(changes)
    return ModelCard(**fields)


def _small_card(**changes: Any) -> ModelCard:
    return _card(backbone="mobilenet_v3_large", **changes)


def _write_card_json(artifact: Location, edit: dict[str, Any]) -> None:
    """Rewrite an artifact's card with some fields replaced (as a bad writer would)."""
    location = artifact.join(CARD_FILE)
    data = json.loads(storage.read_bytes(location))
    data.update(edit)
    storage.write_bytes(location, json.dumps(data).encode())


def _same_tensors(a: nn.Module, b: nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert list(state_a) == list(state_b)
    for key, value in state_a.items():
        assert state_b[key].dtype == value.dtype, key
        assert torch.equal(state_b[key], value), key


def test_round_trip(storage_root: str, model: FCN) -> None:
    card = _card()
    uri = save_model(model, card, model_uri(storage_root, "run-001"))
    assert uri.endswith("/models/run-001")
    names = sorted(f.relpath for f in storage.list_files(uri))
    assert names == ["model.json", "model.safetensors"]

    loaded, loaded_card = load_artifact(uri)
    assert isinstance(loaded, FCN)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    _same_tensors(model, loaded)
    x = torch.randn(2, 3, 45, 61, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected, got = model(x), loaded(x)
    assert expected.abs().sum() > 0
    assert torch.equal(expected, got)
    assert (loaded.head_name, loaded.backbone_name, loaded.num_classes) == ("fcn8s", "resnet18", 4)

    # The card: every field as given, plus the weights' name and hash.
    assert loaded_card.weights_file == "model.safetensors"
    assert loaded_card.weights_sha256 is not None
    assert replace(loaded_card, weights_file=None, weights_sha256=None).to_json() == card.to_json()
    assert loaded_card.created_at == card.created_at
    assert loaded_card.class_names == CLASS_NAMES
    assert loaded_card.normalization_name == "imagenet"
    assert set(loaded_card.library_versions) == {
        "python",
        "torch",
        "torchvision",
        "numpy",
        "safetensors",
        "fcnpipe",
    }
    iou = loaded_card.metrics["iou"]
    assert len(iou) == NUM_CLASSES and math.isnan(iou[1])
    assert iou[0] == pytest.approx(float(_metrics()["iou"][0]))
    assert loaded_card.metrics["mean_iou"] == pytest.approx(_metrics()["mean_iou"])
    # The JSON itself: valid (null, not NaN), no storage options, dataclasses as dicts.
    raw = json.loads(storage.read_bytes(storage.join(uri, CARD_FILE)))
    assert raw["format_version"] == CARD_FORMAT_VERSION
    assert raw["metrics"]["iou"][1] is None
    assert raw["training_config"] == {
        "train": {"lr": 1e-3, "epochs": 2, "crop": [64, 64]},
        "seed": 0,
    }

    # The other entry points agree.
    assert load_card(uri).to_json() == loaded_card.to_json()
    alone = load_model(uri)
    assert not alone.training
    _same_tensors(model, alone)


def test_non_default_options_survive(storage_root: str) -> None:
    torch.manual_seed(3)
    model = _perturbed(build_model("fcn16s_resnet18", 3, learn_upsample=(False, True)), seed=4)
    card = _card(
        architecture="fcn16s",
        num_classes=3,
        class_names=["a", "b", "c"],
        metrics={"pixel_acc": 0.5},
        model_options={"learn_upsample": (False, True), "dropout": 0.25},
        normalization=describe_normalization("caffe_bgr"),
    )
    uri = save_model(model, card, storage.join(storage_root, "m"))
    loaded, loaded_card = load_artifact(uri)
    assert loaded_card.model_options == {"learn_upsample": [False, True], "dropout": 0.25}
    assert loaded_card.normalization_name == "caffe_bgr"
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    assert {name: p.requires_grad for name, p in loaded.named_parameters()} == flags
    assert [up.weight.requires_grad for up in loaded.head.upsamplers] == [False, True]
    _same_tensors(model, loaded)
    # The default build differs, so the option really came from the card.
    default = build_model("fcn16s_resnet18", 3)
    assert [up.weight.requires_grad for up in default.head.upsamplers] == [True, False]


def test_missing_card_is_an_unfinished_artifact(root: Location, small: FCN) -> None:
    artifact = root.join("models", "torn")
    storage.write_bytes(artifact.join("model.safetensors"), export_state_dict_bytes(small))
    with pytest.raises(ArtifactNotFound, match="no model card") as info:
        load_model(artifact)
    assert artifact.uri in str(info.value) and "written last" in str(info.value)
    with pytest.raises(ArtifactNotFound):
        load_card(root.join("models", "nothing-here"))


def test_corrupted_weights(root: Location, small: FCN) -> None:
    artifact = root.join("bad")
    save_model(small, _small_card(), artifact)
    weights = artifact.join("model.safetensors")
    data = storage.read_bytes(weights)
    storage.write_bytes(weights, data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="SHA-256") as info:
        load_model(artifact)
    assert weights.uri in str(info.value)
    # Without a hash in the card, the format itself catches it.
    _write_card_json(artifact, {"weights_sha256": None})
    with pytest.raises(ArtifactError, match="cannot read the weights") as info:
        load_model(artifact)
    assert weights.uri in str(info.value)
    # Weights named by the card but gone.
    storage.delete(weights)
    with pytest.raises(ArtifactError, match="missing"):
        load_model(artifact)


def test_unknown_architecture_names_the_uri(root: Location, small: FCN) -> None:
    artifact = root.join("odd")
    save_model(small, _small_card(), artifact)
    _write_card_json(artifact, {"architecture": "fcn4s"})
    with pytest.raises(ArtifactError, match="unknown architecture 'fcn4s'") as info:
        load_artifact(artifact)
    assert artifact.uri in str(info.value)
    _write_card_json(artifact, {"architecture": "fcn8s", "backbone": "vgg19"})
    with pytest.raises(ArtifactError, match="unknown backbone 'vgg19'"):
        load_artifact(artifact)


def test_card_and_weights_disagree(root: Location, small: FCN) -> None:
    artifact = root.join("mismatch")
    save_model(small, _small_card(), artifact)
    _write_card_json(
        artifact,
        {
            "num_classes": 5,
            "class_names": [*CLASS_NAMES, "star"],
            "metrics": {},
            "weights_sha256": None,
        },
    )
    with pytest.raises(ArtifactError, match=r"'head\.score_fr\.weight' has shape") as info:
        load_model(artifact)
    channels = small.head.score_fr.in_channels
    assert artifact.uri in str(info.value)
    assert f"(4, {channels}, 1, 1), expected (5, {channels}, 1, 1)" in str(info.value)
    # A head that is not the weights' one: keys missing.
    _write_card_json(
        artifact, {"architecture": "fcn32s", "num_classes": 4, "class_names": CLASS_NAMES}
    )
    with pytest.raises(ArtifactError, match=r"key 'head\.upscore\.weight' .* is missing"):
        load_model(artifact)


def test_save_refuses_a_card_that_does_not_describe_the_model(root: Location, small: FCN) -> None:
    artifact = root.join("refused")
    with pytest.raises(ValueError, match="num_classes=3"):
        save_model(
            small, _small_card(num_classes=3, class_names=["a", "b", "c"], metrics={}), artifact
        )
    # The options do not change the model's attributes, only its keys or shapes.
    with pytest.raises(ValueError, match="learn_upsample needs one flag per"):
        save_model(small, _small_card(model_options={"learn_upsample": [True]}), artifact)
    assert not storage.exists(artifact)


@pytest.mark.parametrize("secret", ["plain-secret-0123456789abcdef", 'odd"secret\\with/escapes'])
def test_secret_guard(
    root: Location, small: FCN, monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    if os.environ.get("AWS_SECRET_ACCESS_KEY"):
        # The S3 backend: the server's real secret, still needed to check the bucket below.
        secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    else:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    artifact = root.join("leaky")
    card = _small_card(
        training_config={"endpoint": "http://127.0.0.1:8333", "auth": {"key": secret}}
    )
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY") as info:
        save_model(small, card, artifact)
    assert secret not in str(info.value) and secret not in repr(info.value)
    assert not storage.exists(artifact)
    # A session token is guarded too, wherever it hides in the card (checked before any
    # I/O, so this fake token never reaches the server).
    token = "session-token-" + "x" * 40
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    with pytest.raises(ValueError, match="AWS_SESSION_TOKEN") as info:
        save_model(small, _small_card(dataset_uri=f"s3://data/{token}"), artifact)
    assert token not in str(info.value)


def test_torch_save_fallback(root: Location, small: FCN) -> None:
    artifact = root.join("pt")
    save_model(small, _small_card(), artifact)
    save_model(small, _small_card(), artifact, weights_format="torch")
    names = sorted(f.relpath for f in storage.list_files(artifact))
    assert names == ["model.json", "model.pt"]  # the stale safetensors file is gone
    state = torch.load(io.BytesIO(storage.read_bytes(artifact.join("model.pt"))), weights_only=True)
    assert set(state) == set(small.state_dict())
    loaded, card = load_artifact(artifact)
    assert card.weights_file == "model.pt"
    _same_tensors(small, loaded)

    # A card that names no weights file: the loader finds model.pt.
    _write_card_json(artifact, {"weights_file": None, "weights_sha256": None})
    _same_tensors(small, load_model(artifact))

    # Anything but tensors in the pickle is refused (weights_only), never executed.
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(1), "config": _TrainConfig()}, buffer)
    storage.write_bytes(artifact.join("model.pt"), buffer.getvalue())
    with pytest.raises(ArtifactError, match="cannot read the weights"):
        load_model(artifact)


def test_card_validation_and_json() -> None:
    card = _card()
    again = ModelCard.from_json(card.to_json())
    assert again.to_json() == card.to_json()
    assert math.isnan(again.metrics["iou"][1]) and math.isnan(card.metrics["iou"][1])
    with pytest.raises(ValueError, match="3 class_names for num_classes=4"):
        _card(class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="one per class"):
        _card(metrics={"iou": np.zeros(3)})
    with pytest.raises(ValueError, match="infinite"):
        _card(metrics={"mean_iou": math.inf})
    with pytest.raises(ValueError, match="invalid run id"):
        _card(run_id="../escape")
    with pytest.raises(ValueError, match="user:password"):
        _card(dataset_uri="https://user:pw@host/data")
    with pytest.raises(ValueError, match="unknown model_options"):
        _card(model_options={"learn_upsampling": [True, True, False]})
    with pytest.raises(ValueError, match="not valid JSON"):
        _card(training_config={"lr": math.nan})
    data = json.loads(card.to_json())
    with pytest.raises(ValueError, match="newer"):
        ModelCard.from_json(json.dumps({**data, "format_version": CARD_FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match="unknown field"):
        ModelCard.from_json(json.dumps({**data, "storage_options": {}}))
    del data["class_names"]
    with pytest.raises(ValueError, match="lacks field"):
        ModelCard.from_json(json.dumps(data))
    with pytest.raises(ValueError, match="invalid run id"):
        model_uri("s3://out", "a/b")
    assert model_uri("s3://out/", "r1") == "s3://out/models/r1"
