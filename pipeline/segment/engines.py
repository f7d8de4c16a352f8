"""Inference engines: a trained model loaded and run for segmentation, behind one interface.

An engine loads a model artifact once, says how it runs (``name``: the runtime and its
version; ``precision``), and turns a batch of uint8 RGB images, ``(N, 3, H, W)``, into class
ids at the images' own size. Three: :class:`TorchEngine` (the ``nn.Module``, under the
precision policy of :mod:`pipeline.compute`), :class:`OnnxRuntimeEngine` and
:class:`OpenVinoEngine` (the artifact's ONNX export, :mod:`pipeline.export`, whose graph
normalizes and takes the arg-max itself). The inference actors and the benchmarks' bare loops
call the same engine, so a benchmark's "bare engine" is exactly what the pipeline runs.

``backend="auto"`` (:func:`load_engine`) loads every installed engine that can run the asked
precision and times each at the run's size on this machine (cached per machine with the
precision probes), then keeps the fastest: it is never slower than the best engine it could
have picked by more than the probe's noise. Measured on a 2-core AMD EPYC with AVX512-BF16:
torch bf16 + channels_last leads on FCN-8s ResNet-18, OpenVINO bf16 on FCN-8s VGG16; on an
AVX2-only EPYC ONNX Runtime fp32 led both.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, get_args

import numpy as np

from pipeline.compute import ComputeConfig, ComputePlan, inference_probe, measured, native_bf16
from pipeline.compute import resolve as resolve_compute
from pipeline.errors import ConfigError
from pipeline.storage import StorageOptions

if TYPE_CHECKING:
    import torch

    from pipeline.artifacts import ModelCard

__all__ = [
    "BACKENDS",
    "PROBE_SIDE",
    "Backend",
    "Engine",
    "OnnxRuntimeEngine",
    "OpenVinoEngine",
    "TorchEngine",
    "class_argmax",
    "installed_backends",
    "load_engine",
]

Backend = Literal["auto", "torch", "onnxruntime", "openvino"]
BACKENDS: tuple[str, ...] = get_args(Backend)

PROBE_SIDE = 256
"""Side of the probe's input where the run has no ``resize`` (images vary)."""

_PROBE_REPEATS = 3
_PACKAGES = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino"}


class Engine(Protocol):
    """What the actors need of an engine."""

    card: ModelCard
    """The artifact's model card."""

    @property
    def name(self) -> str:
        """The runtime and its version, e.g. ``onnxruntime 1.32.0``."""
        ...

    @property
    def precision(self) -> str:
        """``fp32``, ``bf16`` or ``fp16``: what the model computes in."""
        ...

    @property
    def channels_last(self) -> bool | None:
        """Whether the torch model runs channels_last (None: the runtime chooses layouts)."""
        ...

    def describe(self) -> str:
        """One line for the logs and the summary."""
        ...

    def labels(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W) class ids of a uint8 RGB batch (N, 3, H, W) of equal-size images."""
        ...

    def scores(self, images: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 class scores (logits) of a uint8 RGB batch, at its size (the
        tiles of :mod:`pipeline.segment.tiles` blend them)."""
        ...


def _version(backend: str) -> str:
    return importlib.metadata.version(_PACKAGES[backend]).split("+")[0]


def installed_backends() -> list[str]:
    """The engines this machine can load (torch always; the others if their package is)."""
    return [b for b in BACKENDS[1:] if importlib.util.find_spec(_PACKAGES[b]) is not None]


def _resized(images: torch.Tensor, resize: int | None) -> torch.Tensor:
    """``images`` (float) with the longer side at ``resize`` (as they are without)."""
    import torch.nn.functional as F

    size = images.shape[-2:]
    if resize is None or max(size) == resize:
        return images
    scale = resize / max(size)
    small = [max(1, round(side * scale)) for side in size]
    return F.interpolate(images, size=small, mode="bilinear", align_corners=False)


def class_argmax(scores: torch.Tensor) -> torch.Tensor:
    """(N, H, W) arg-max over the classes of (N, C, H, W) scores, over a channels_last layout.

    With the classes innermost, the arg-max is one contiguous pass; over NCHW planes torch's
    arg-max strides across them, and costs 23 % of FCN-8s ResNet-18's time on a 4.7 MP photo
    (341 ms against 18 ms; 2 threads, AMD EPYC). channels_last models produce that layout
    already; others pay one copy. bf16 scores are compared as they are (exact in fp32).
    """
    if scores.shape[1] > 1 and scores.stride(1) != 1:
        scores = scores.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    return scores.argmax(1)


class TorchEngine:
    """The model in PyTorch, under the precision policy of :mod:`pipeline.compute`.

    Args:
        model_uri: The model artifact.
        device: Where it runs.
        compute: The precision policy asked (``auto`` is resolved here, on this machine).
        resize: Run the network with the longer side at this, the scores upsampled back.
        storage: How to reach the artifact.
    """

    def __init__(
        self,
        model_uri: str,
        *,
        device: torch.device,
        compute: ComputeConfig,
        resize: int | None = None,
        storage: StorageOptions | None = None,
    ) -> None:
        from pipeline.artifacts import load_artifact

        self.device = device
        self.resize = resize
        model, card = load_artifact(model_uri, device=device, options=storage)
        self.card: ModelCard = card
        side = resize or PROBE_SIDE
        self.plan: ComputePlan = resolve_compute(
            compute,
            device,
            probe=inference_probe(model, (side, side)),
            key=f"segment {card.architecture}_{card.backbone} 1x{side}x{side}",
        )
        self.model = self.plan.prepare(model)

    @property
    def name(self) -> str:
        """E.g. ``torch 2.14.1``."""
        return f"torch {_version('torch')}"

    @property
    def precision(self) -> str:
        """What the forward pass computes in."""
        return self.plan.precision

    @property
    def channels_last(self) -> bool | None:
        """Whether the model runs channels_last."""
        return self.plan.channels_last

    def describe(self) -> str:
        """E.g. ``torch 2.14.1 bf16 + channels_last (auto on ...)``."""
        return f"{self.name} {self.plan.describe()}"

    def labels(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W) class ids of a uint8 RGB batch (N, 3, H, W)."""
        import torch
        import torch.nn.functional as F

        from fcn.transforms import normalize

        compute = self.plan.compute
        batch = torch.from_numpy(images).to(self.device)
        inputs = normalize(batch, self.card.normalization_name)
        size = inputs.shape[-2:]
        with torch.inference_mode(), compute.autocast(self.device.type):
            logits = self.model(compute.inputs(_resized(inputs, self.resize)))
            if logits.shape[-2:] != size:
                logits = F.interpolate(
                    logits.float(), size=list(size), mode="bilinear", align_corners=False
                )
            labels = class_argmax(logits)
        return np.asarray(labels.cpu().numpy())

    def scores(self, images: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 logits of a uint8 RGB batch (N, 3, H, W), at its size."""
        import torch

        from fcn.transforms import normalize

        compute = self.plan.compute
        batch = torch.from_numpy(images).to(self.device)
        with torch.inference_mode(), compute.autocast(self.device.type):
            logits = self.model(compute.inputs(normalize(batch, self.card.normalization_name)))
        return np.asarray(logits.float().contiguous().cpu().numpy())


class _OnnxEngine:
    """What the two ONNX engines share: the checked export, resizing, the probe input."""

    backend = "onnxruntime"

    def __init__(
        self,
        model_uri: str,
        card: ModelCard,
        *,
        resize: int | None = None,
        storage: StorageOptions | None = None,
    ) -> None:
        from pipeline.export import read_onnx

        self.card = card
        self.resize = resize
        self.onnx = read_onnx(model_uri, card, storage)

    @property
    def name(self) -> str:
        """The runtime and its version."""
        return f"{self.backend} {_version(self.backend)}"

    @property
    def channels_last(self) -> bool | None:
        """None: the runtime chooses its own layouts."""
        return None

    def _run(self, images: np.ndarray, output: str) -> np.ndarray:
        raise NotImplementedError

    def scores(self, images: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 logits of a uint8 RGB batch: the graph's ``scores``."""
        return np.asarray(self._run(np.ascontiguousarray(images), "scores"), np.float32)

    def labels(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W) class ids of a uint8 RGB batch (N, 3, H, W): the graph's own arg-max, or
        its scores upsampled back where the network runs at ``resize``."""
        if self.resize is None or max(images.shape[-2:]) == self.resize:
            return self._run(np.ascontiguousarray(images), "label_map")
        import torch
        import torch.nn.functional as F

        size = images.shape[-2:]
        small = _resized(torch.from_numpy(images).float(), self.resize)
        scores = self._run(small.round().clamp(0, 255).to(torch.uint8).numpy(), "scores")
        upsampled = F.interpolate(
            torch.from_numpy(scores), size=list(size), mode="bilinear", align_corners=False
        )
        return np.asarray(class_argmax(upsampled).numpy())


class OnnxRuntimeEngine(_OnnxEngine):
    """The ONNX export in ONNX Runtime (CPU execution provider: fp32)."""

    backend = "onnxruntime"

    def __init__(
        self,
        model_uri: str,
        card: ModelCard,
        *,
        threads: int,
        resize: int | None = None,
        storage: StorageOptions | None = None,
    ) -> None:
        import onnxruntime as ort

        super().__init__(model_uri, card, resize=resize, storage=storage)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.onnx, options, providers=["CPUExecutionProvider"])

    @property
    def precision(self) -> str:
        """fp32: ONNX Runtime's CPU provider has no bf16 convolutions."""
        return "fp32"

    def describe(self) -> str:
        """E.g. ``onnxruntime 1.32.0 fp32 (CPUExecutionProvider)``."""
        return f"{self.name} fp32 (CPUExecutionProvider)"

    def _run(self, images: np.ndarray, output: str) -> np.ndarray:
        (result,) = self.session.run([output], {"image": images})
        return np.asarray(result)


class OpenVinoEngine(_OnnxEngine):
    """The ONNX export in OpenVINO (CPU plugin; bf16 through its precision hint where the CPU
    runs bf16 natively, else fp32; one dynamic-shape model: no reshape per image size)."""

    backend = "openvino"

    def __init__(
        self,
        model_uri: str,
        card: ModelCard,
        *,
        threads: int,
        precision: str,
        resize: int | None = None,
        storage: StorageOptions | None = None,
    ) -> None:
        import openvino as ov

        super().__init__(model_uri, card, resize=resize, storage=storage)
        self._precision = precision
        core = ov.Core()
        with tempfile.TemporaryDirectory(prefix="fcnpipe-ov-") as tmp:
            path = Path(tmp) / "model.onnx"
            path.write_bytes(self.onnx)
            model = core.read_model(str(path))
        hint = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[precision]
        self.compiled = core.compile_model(
            model,
            "CPU",
            {
                "INFERENCE_NUM_THREADS": threads,
                "INFERENCE_PRECISION_HINT": hint,
                "PERFORMANCE_HINT": "LATENCY",
            },
        )
        self.request = self.compiled.create_infer_request()

    @property
    def precision(self) -> str:
        """What the precision hint asked."""
        return self._precision

    def describe(self) -> str:
        """E.g. ``openvino 2026.4.1 bf16 (CPU)``."""
        return f"{self.name} {self._precision} (CPU)"

    def _run(self, images: np.ndarray, output: str) -> np.ndarray:
        result = self.request.infer({"image": images})
        return np.asarray(result[self.compiled.output(output)])


def load_engine(
    model_uri: str,
    *,
    backend: str,
    compute: ComputeConfig,
    device: torch.device,
    threads: int,
    resize: int | None = None,
    storage: StorageOptions | None = None,
) -> Engine:
    """The engine a segmentation runs: the one asked, or for ``auto`` the fastest here.

    Args:
        model_uri: The artifact (with an ONNX export for the ONNX engines:
            :func:`pipeline.export.ensure_onnx` makes one).
        backend: ``auto``, ``torch``, ``onnxruntime`` or ``openvino``.
        compute: The precision policy (``auto`` resolved per engine on this machine).
        device: Where the model runs (the ONNX engines run on a CPU).
        threads: Threads of the engine.
        resize: Run the network at this longer side.
        storage: How to reach the artifact.

    Raises:
        ConfigError: The engine is not installed, or cannot run the asked precision here.
        pipeline.artifacts.ArtifactError: An ONNX engine without an export, or an export that
            does not match its card.
    """
    from pipeline.artifacts import load_card

    card = load_card(model_uri, storage)
    built: dict[str, Engine] = {}

    def build(name: str) -> Engine:
        if name not in built:
            built[name] = _load(name, model_uri, card, compute, device, threads, resize, storage)
        return built[name]

    candidates = _candidates(backend, compute, device)
    if len(candidates) == 1:
        return build(candidates[0])
    side = resize or PROBE_SIDE
    key = f"engine {card.architecture}_{card.backbone} 1x{side}x{side} {compute.precision}"
    timings = measured(
        {name: functools.partial(_engine_seconds, build, name, side) for name in candidates},
        key,
        device,
    )
    best = min(candidates, key=lambda name: timings[name])
    chosen = _Chosen(build(best), timings)
    built.clear()  # the engines not kept go now (an actor holds one model)
    return chosen


def _load(
    name: str,
    model_uri: str,
    card: ModelCard,
    compute: ComputeConfig,
    device: torch.device,
    threads: int,
    resize: int | None,
    storage: StorageOptions | None,
) -> Engine:
    if name == "torch":
        return TorchEngine(
            model_uri, device=device, compute=compute, resize=resize, storage=storage
        )
    if name == "onnxruntime":
        return OnnxRuntimeEngine(model_uri, card, threads=threads, resize=resize, storage=storage)
    precision = compute.precision
    if precision == "auto":
        precision = "bf16" if native_bf16(device) else "fp32"
    return OpenVinoEngine(
        model_uri, card, threads=threads, precision=precision, resize=resize, storage=storage
    )


def _engine_seconds(build: Callable[[str], Engine], name: str, side: int) -> float:
    """Median seconds of the engine ``name`` on a random uint8 image of ``side``."""
    engine = build(name)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1, 3, side, side), dtype=np.uint8)
    engine.labels(images)  # warm-up: kernels chosen, memory allocated
    times = []
    for _ in range(_PROBE_REPEATS):
        began = time.perf_counter()
        engine.labels(images)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


class _Chosen:
    """The engine ``auto`` kept, and what every candidate measured."""

    def __init__(self, engine: Engine, timings_ms: dict[str, float]) -> None:
        self.engine = engine
        self.card = engine.card
        self.timings_ms = timings_ms

    @property
    def name(self) -> str:
        """The kept engine's."""
        return self.engine.name

    @property
    def precision(self) -> str:
        """The kept engine's."""
        return self.engine.precision

    @property
    def channels_last(self) -> bool | None:
        """The kept engine's."""
        return self.engine.channels_last

    def describe(self) -> str:
        """The kept engine, and the probe's milliseconds of every candidate."""
        others = ", ".join(f"{name} {ms:.0f} ms" for name, ms in self.timings_ms.items())
        return f"{self.engine.describe()}; auto engine, measured {others}"

    def labels(self, images: np.ndarray) -> np.ndarray:
        """The kept engine's."""
        return self.engine.labels(images)

    def scores(self, images: np.ndarray) -> np.ndarray:
        """The kept engine's."""
        return self.engine.scores(images)


def _candidates(backend: str, compute: ComputeConfig, device: torch.device) -> list[str]:
    """The engines to load: the one asked (checked), or those ``auto`` may pick from."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    installed = installed_backends()
    if backend != "auto":
        if backend not in installed:
            raise ConfigError(
                f"--backend {backend}: its package ({_PACKAGES[backend]}) is not installed "
                f"here; installed: {', '.join(installed)}"
            )
        if backend == "onnxruntime" and compute.precision in ("bf16", "fp16"):
            raise ConfigError(
                f"--backend onnxruntime runs fp32 on a CPU; --precision {compute.precision} "
                "needs --backend torch or openvino"
            )
        if backend != "torch" and device.type != "cpu":
            raise ConfigError(f"--backend {backend} runs on a CPU here; use torch with a GPU")
        return [backend]
    if device.type != "cpu":
        return ["torch"]
    return [b for b in installed if b != "onnxruntime" or compute.precision in ("auto", "fp32")]
