"""One precision policy for training, validation and segmentation, chosen where the model runs.

``ComputeConfig`` (the ``compute`` section of ``TrainConfig`` and ``SegmentConfig``) asks for a
precision (``auto``, ``fp32``, ``bf16``, ``fp16``), a memory layout (``auto``,
``channels_last``, ``contiguous``) and, optionally, ``torch.compile``. :func:`resolve` turns it
into an ``fcn.engine.Compute`` on the process that runs the model (a Ray Train rank, an
inference actor), and says why.

``auto``, on a GPU: bf16 where the GPU has it (else fp32), channels_last. On a CPU the choice
is measured, because the same names run very differently on different CPUs (bf16 is 2-3x
faster than fp32 where oneDNN runs it natively, with AMX or AVX512-BF16, and 7x *slower*
where it is emulated): the candidates are fp32 and, only on a CPU whose oneDNN runs bf16
natively (``torch.cpu.get_capabilities()``: ``amx_bf16`` or ``avx512_bf16``), bf16, each in
both layouts; a short probe times the very model at the run's size (a forward pass, or forward
and backward for training) and the fastest wins. fp32 contiguous is always a candidate, so
``auto`` never picks anything slower than it (within the probe's noise). fp16 is used only
where asked (with a gradient scaler in training).

Probes are cached per machine in ``$FCNPIPE_CACHE`` (default ``~/.cache/fcnpipe``)
``/compute.json``, keyed by the CPU's name and capabilities, the torch version, the model, the
probe's shape, the thread count and the mode: the first actor on a node pays a few seconds,
the others and later runs read the answer.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

from pipeline.config import FORBID, check_choice

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fcn.engine import Compute

__all__ = [
    "MEMORY_FORMATS",
    "PRECISIONS",
    "ComputeConfig",
    "ComputePlan",
    "MemoryFormat",
    "Precision",
    "measured",
    "native_bf16",
    "resolve",
]

logger = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
MemoryFormat = Literal["auto", "channels_last", "contiguous"]
MEMORY_FORMATS: tuple[str, ...] = get_args(MemoryFormat)

_PROBE_WARMUP = 1
_PROBE_REPEATS = 3


@dataclass(frozen=True, kw_only=True)
class ComputeConfig:
    """How the model runs: precision, memory layout, compilation (training, validation and
    segmentation alike)."""

    __pydantic_config__: ClassVar[dict[str, str]] = FORBID

    precision: Precision = "auto"
    """``auto`` (bf16 on a GPU that has it; on a CPU the fastest of fp32 and, where oneDNN
    runs it natively, bf16, measured), ``fp32``, ``bf16`` or ``fp16`` (with a gradient scaler
    in training)."""
    memory_format: MemoryFormat = "auto"
    """``channels_last`` (NHWC), ``contiguous`` (NCHW) or ``auto`` (measured on a CPU,
    channels_last on a GPU)."""
    compile: bool = False
    """``torch.compile`` the model (dynamic shapes: images of new sizes do not recompile);
    pays only when the run is long enough to amortise a compile of tens of seconds."""

    def __post_init__(self) -> None:
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("memory_format", self.memory_format, MEMORY_FORMATS)


@dataclass(frozen=True)
class ComputePlan:
    """What :func:`resolve` chose, and why."""

    compute: Compute
    """Precision and memory layout."""
    compile: bool = False
    """Whether the model is compiled."""
    reason: str = "as configured"
    """Why, in words (the probe's timings where one ran)."""
    timings_ms: dict[str, float] = field(default_factory=dict)
    """Probe: milliseconds per pass of each candidate (empty when nothing was measured)."""

    @property
    def precision(self) -> str:
        """``fp32``, ``bf16`` or ``fp16``."""
        return self.compute.precision

    @property
    def channels_last(self) -> bool:
        """Whether model and inputs are channels_last."""
        return self.compute.channels_last

    def describe(self) -> str:
        """One line, e.g. ``bf16 + channels_last (auto: 35 ms vs fp32 99 ms a pass)``."""
        compiled = ", compiled" if self.compile else ""
        return f"{self.compute.name}{compiled} ({self.reason})"

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model in this plan's memory format (in place), compiled if asked."""
        model = self.compute.model(model)
        if self.compile:
            import torch

            # Dynamic shapes: one graph for every image size (a static one recompiles per size).
            return torch.compile(model, dynamic=True)  # type: ignore[return-value]
        return model

    def record(self) -> dict[str, Any]:
        """The plan for a model card or a table row."""
        return {
            "precision": self.precision,
            "channels_last": self.channels_last,
            "compile": self.compile,
            "reason": self.reason,
        }


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 runs natively here: a GPU that supports it, or a CPU whose oneDNN has
    AMX-BF16 or AVX512-BF16 instructions (read from the CPU, not guessed from its name)."""
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    capabilities = torch.cpu.get_capabilities()
    native = bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))
    return native and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve(
    config: ComputeConfig,
    device: torch.device,
    *,
    probe: Callable[[Compute], float] | None = None,
    key: str = "",
) -> ComputePlan:
    """The precision and memory layout for this process, by ``config`` and, for ``auto`` on a
    CPU, by measurement.

    Args:
        config: What was asked.
        device: Where the model runs.
        probe: Seconds one pass of the real work takes with a given ``Compute``
            (:func:`inference_probe`, :func:`training_probe`); None: no measurement (``auto``
            then takes fp32 contiguous on a CPU).
        key: What the probe runs (model, shape, mode), for the cache.
    """
    from fcn.engine import Compute

    if device.type == "cuda":
        precision = config.precision
        reason = "as configured"
        if precision == "auto":
            precision = "bf16" if native_bf16(device) else "fp32"
            reason = f"auto: {'bf16' if precision == 'bf16' else 'no bf16'} on this GPU"
        channels_last = config.memory_format != "contiguous"
        return ComputePlan(Compute(precision, channels_last), config.compile, reason)
    precisions = [config.precision]
    if config.precision == "auto":
        precisions = ["fp32", "bf16"] if native_bf16(device) else ["fp32"]
    layouts = {"auto": [False, True], "channels_last": [True], "contiguous": [False]}[
        config.memory_format
    ]
    candidates = [Compute(p, cl) for p in precisions for cl in layouts]
    if len(candidates) == 1:
        return ComputePlan(candidates[0], config.compile, "as configured")
    if probe is None:
        return ComputePlan(Compute(), config.compile, "auto without a probe: fp32")
    timings = _measure(candidates, probe, key, device)
    best = min(candidates, key=lambda c: timings[c.name])
    reference = timings.get(Compute().name)
    versus = f" vs fp32 {reference:.0f} ms" if reference is not None and best != Compute() else ""
    cpu = _cpu_name()
    reason = f"auto on {cpu}: {timings[best.name]:.0f} ms a pass{versus}"
    return ComputePlan(best, config.compile, reason, timings)


def inference_probe(
    model: nn.Module, size: tuple[int, int], batch: int = 1
) -> Callable[[Compute], float]:
    """A probe timing the model's forward pass and arg-max on a random (batch, 3, H, W) input.

    The model is not changed (a copy is put in each memory format).
    """
    import torch

    def run(compute: Compute) -> float:
        candidate = compute.model(copy.deepcopy(model)).eval()
        device = next(candidate.parameters()).device
        images = compute.inputs(torch.randn(batch, 3, *size, device=device))
        times = []
        with torch.inference_mode():
            for _ in range(_PROBE_WARMUP + _PROBE_REPEATS):
                began = time.perf_counter()
                with compute.autocast(device.type):
                    logits = candidate(images)
                logits.float().argmax(1)
                times.append(time.perf_counter() - began)
        return statistics.median(times[_PROBE_WARMUP:])

    return run


def training_probe(
    model: nn.Module, size: tuple[int, int], batch: int, num_classes: int
) -> Callable[[Compute], float]:
    """A probe timing forward and backward of the model (in train mode) on a random batch.

    The model is not changed (the probe trains a copy; its gradients and BatchNorm
    statistics are thrown away).
    """
    import torch

    from fcn.engine import forward_backward

    def run(compute: Compute) -> float:
        candidate = compute.model(copy.deepcopy(model)).train()
        device = next(candidate.parameters()).device
        images = torch.randn(batch, 3, *size, device=device)
        masks = torch.randint(0, num_classes, (batch, *size), device=device)
        times = []
        for _ in range(_PROBE_WARMUP + _PROBE_REPEATS):
            began = time.perf_counter()
            forward_backward(candidate, images, masks, compute=compute)
            times.append(time.perf_counter() - began)
            candidate.zero_grad(set_to_none=True)
        return statistics.median(times[_PROBE_WARMUP:])

    return run


def _cpu_name() -> str:
    import torch

    capabilities = torch.cpu.get_capabilities()
    flags = [f for f in ("amx_bf16", "avx512_bf16", "avx512_f", "avx2") if capabilities.get(f)]
    name = str(capabilities.get("cpu_name") or "CPU")
    return f"{name} ({flags[0] if flags else 'no AVX2'})"


def _cache_file() -> Path | None:
    root = os.environ.get("FCNPIPE_CACHE", "~/.cache/fcnpipe")
    if root.lower() in ("", "off", "none"):
        return None
    return Path(root).expanduser() / "compute.json"


def _cache_key(key: str, device: torch.device) -> str:
    import torch

    capabilities = torch.cpu.get_capabilities()
    machine = json.dumps(
        {k: v for k, v in sorted(capabilities.items()) if isinstance(v, bool) and v}
    )
    digest = hashlib.sha256(machine.encode()).hexdigest()[:12]
    return (
        f"{capabilities.get('cpu_name')}/{digest}|torch {torch.__version__}|{device.type}|"
        f"threads {torch.get_num_threads()}|{key}"
    )


def _measure(
    candidates: list[Compute], probe: Callable[[Compute], float], key: str, device: torch.device
) -> dict[str, float]:
    """Milliseconds a pass of each candidate: from the cache, else measured (and cached)."""
    probes: dict[str, Callable[[], float]] = {
        c.name: functools.partial(probe, c) for c in candidates
    }
    return measured(probes, key, device)


def measured(
    probes: dict[str, Callable[[], float]], key: str, device: torch.device
) -> dict[str, float]:
    """Milliseconds a pass of each named candidate, from the per-machine cache (see the
    module docstring) or measured by its probe (seconds a pass) and then cached.

    Args:
        probes: Candidate name -> its probe.
        key: What the probes run (model, shape, mode).
        device: Where they run.
    """
    path = _cache_file()
    full_key = _cache_key(key, device)
    cached: dict[str, Any] = {}
    if path is not None:
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            cached = {}
    entry = cached.get(full_key) or {}
    if all(name in entry for name in probes):
        return {name: float(entry[name]) for name in probes}
    timings = {name: probe() * 1000 for name, probe in probes.items()}
    logger.info("compute probe %s: %s", key, timings)
    if path is not None:
        cached[full_key] = {**entry, **timings}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Atomic: actors on one node may probe and write at the same time.
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as tmp:
                json.dump(cached, tmp, indent=1, sort_keys=True)
            os.replace(tmp.name, path)
        except OSError as exc:  # a read-only home: measure again next time
            logger.warning("compute probe cache %s not written: %s", path, exc)
    return timings
