"""The model artifact as ONNX: one self-contained graph that other runtimes take as it is.

Usage:
    fcnpipe export MODEL_URI --format onnx [--out URI]

The graph (:class:`SegmentationGraph`) takes ``image``: uint8 RGB, ``[N, 3, H, W]``, with N,
H and W dynamic; it normalizes inside (the card's normalization) and returns ``label_map``
(int64 class ids, ``[N, H, W]``, the arg-max) and ``scores`` (float32 logits, ``[N, C, H, W]``:
not probabilities; a softmax over C gives them). A client needs nothing of fcnpipe or
torch: ONNX Runtime, OpenVINO, a serving stack or an edge runtime.

The export is kept in the artifact (``model.onnx``) and recorded in its card (opset, input
and output specs, SHA-256): made on first use (``fcnpipe export``, or a segmentation whose
engine needs it) rather than at the end of every training, which would cost every run 5-10 s
whether or not it is ever served outside torch. Loaders check the checksum and refuse a file
that does not match its card.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from fcn.names import Normalization
from fcn.transforms import normalize
from pipeline import storage
from pipeline.artifacts import ONNX_FILE, ArtifactError, ModelCard, load_artifact, write_card
from pipeline.storage import StorageOptions

__all__ = [
    "OPSET",
    "ExportInfo",
    "OnnxMismatch",
    "SegmentationGraph",
    "ensure_onnx",
    "export_onnx",
    "read_onnx",
]

OPSET = 18
"""ONNX opset of the export."""


class OnnxMismatch(ArtifactError):
    """An ONNX file whose SHA-256 is not the one its card records."""


@dataclass(frozen=True)
class ExportInfo:
    """Where an export went and what it is."""

    uri: str
    """The ``.onnx`` file."""
    sha256: str
    """Its checksum."""
    seconds: float
    """How long exporting took."""
    card: ModelCard
    """The card recording it (written only when the export went into the artifact)."""


class SegmentationGraph(torch.nn.Module):
    """The exported module: ``image`` (uint8 RGB ``[N, 3, H, W]``) -> ``(label_map, scores)``.

    Args:
        model: The FCN.
        normalization: The card's normalization (applied inside the graph).
    """

    def __init__(self, model: torch.nn.Module, normalization: Normalization) -> None:
        super().__init__()
        self.model = model
        self.normalization: Normalization = normalization

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class ids (the arg-max) and logits of a uint8 batch."""
        scores = self.model(normalize(image, self.normalization))
        return scores.argmax(1), scores


def _spec(card: ModelCard) -> dict[str, Any]:
    return {
        "file": ONNX_FILE,
        "opset": OPSET,
        "input": {"name": "image", "dtype": "uint8", "shape": ["N", 3, "H", "W"], "order": "RGB"},
        "outputs": {
            "label_map": {"dtype": "int64", "shape": ["N", "H", "W"]},
            "scores": {
                "dtype": "float32",
                "shape": ["N", card.num_classes, "H", "W"],
                "kind": "logits",
            },
        },
    }


def export_onnx(
    model_uri: str, out_uri: str | None = None, *, options: StorageOptions | None = None
) -> ExportInfo:
    """Export a model artifact to ONNX (see the module docstring).

    Args:
        model_uri: The artifact.
        out_uri: Where to write the ``.onnx`` file; None: into the artifact, recorded in its
            card.
        options: Storage options.

    Raises:
        pipeline.artifacts.ArtifactError: The artifact does not load.
    """
    began = time.perf_counter()
    model, card = load_artifact(model_uri, options=options)
    graph = SegmentationGraph(model, card.normalization_name).eval()
    example = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8)
    dim = torch.export.Dim
    with tempfile.TemporaryDirectory(prefix="fcnpipe-onnx-") as tmp:
        path = Path(tmp) / ONNX_FILE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on its own internals
            torch.onnx.export(
                graph,
                (example,),
                str(path),
                input_names=["image"],
                output_names=["label_map", "scores"],
                opset_version=OPSET,
                dynamo=True,
                dynamic_shapes={"image": {0: dim("N"), 2: dim("H"), 3: dim("W")}},
                external_data=False,  # one self-contained file (protobuf's limit is 2 GB)
                verbose=False,
            )
        data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    root = storage.resolve(model_uri, options)
    target = storage.resolve(out_uri, options) if out_uri else root.join(ONNX_FILE)
    storage.write_bytes(target, data)
    if out_uri is None:
        record = {
            **_spec(card),
            "sha256": digest,
            "exported_at": datetime.now(UTC).isoformat(),
            "exporter": f"torch.onnx (dynamo) {torch.__version__.split('+')[0]}",
        }
        card = replace(card, onnx=record)
        write_card(card, root)  # last: the file is in place before the card names it
    return ExportInfo(target.uri, digest, time.perf_counter() - began, card)


def ensure_onnx(
    model_uri: str, card: ModelCard, options: StorageOptions | None = None
) -> ModelCard:
    """The card of an artifact with an ONNX export: as it is, or after exporting into it.

    Raises:
        pipeline.artifacts.ArtifactError: No export and none can be written (a read-only
            artifact: ``fcnpipe export MODEL_URI --out URI`` writes one elsewhere).
    """
    if card.onnx is not None:
        return card
    try:
        return export_onnx(model_uri, options=options).card
    except (PermissionError, storage.AccessDenied) as exc:
        raise ArtifactError(
            f"{model_uri} has no ONNX export and none can be written there ({exc}); export it "
            "with `fcnpipe export MODEL_URI` where you can write, or use --backend torch"
        ) from None


def read_onnx(model_uri: str, card: ModelCard, options: StorageOptions | None = None) -> bytes:
    """The artifact's ONNX file, checked against the checksum its card records.

    Raises:
        pipeline.artifacts.ArtifactError: The card records no export.
        OnnxMismatch: The file is not the one the card records.
    """
    if card.onnx is None:
        raise ArtifactError(
            f"{model_uri} has no ONNX export: run `fcnpipe export {model_uri}`, or use "
            "--backend torch"
        )
    uri = storage.resolve(model_uri, options).join(str(card.onnx["file"])).uri
    data = storage.read_bytes(uri, options)
    if hashlib.sha256(data).hexdigest() != card.onnx["sha256"]:
        raise OnnxMismatch(
            f"{uri}: its SHA-256 is not the one the model card records; the file was changed "
            f"or replaced: export it again (`fcnpipe export {model_uri}`)"
        )
    return data
