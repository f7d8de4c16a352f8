"""``fcnpipe bench model``: the model alone, in every precision and layout, against the machine.

Usage:
    fcnpipe bench model [--model fcn8s_vgg16 --size 500 --batch 1 --threads 2 --compile]

Each row runs the network (random weights: the cost is the same) on a uint8 (batch, 3, size,
size) input through an engine the actors run (:mod:`pipeline.segment.engines`: torch in each
precision and layout, ONNX Runtime, OpenVINO; normalization, forward and arg-max), and prints
images/s and the
achieved GFLOP/s: the network's FLOPs (counted by ``torch.utils.flop_counter``, not guessed)
over the measured time. Next to it, the same run's matrix-multiply peak for that dtype on this
machine (a 4096 x 4096 GEMM with the same threads), so each row's ratio says how close to the
limit it runs. The CPU's name and bf16 capability head the table.
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcn.engine import Compute
from fcn.models import build_model
from pipeline.cluster import WORKER_ENV
from pipeline.compute import native_bf16

__all__ = ["bench_model", "count_flops", "format_bench_model", "matmul_peak"]


def matmul_peak(dtype: torch.dtype, *, n: int = 4096, repeats: int = 3) -> float:
    """GFLOP/s of an ``n`` x ``n`` x ``n`` matrix multiply in ``dtype`` on this CPU, the best
    of ``torch.mm`` (the BLAS torch links) and the same product as a 1x1 convolution (oneDNN,
    which runs the model's convolutions), each the best of ``repeats``."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    side = int(n**0.5)
    image = torch.randn(1, n, side, side).to(dtype)  # side * side = n pixels
    weight = torch.randn(n, n, 1, 1).to(dtype)
    best = float("inf")
    with torch.inference_mode():
        for product in (lambda: torch.mm(a, b), lambda: torch.conv2d(image, weight)):
            product()  # warm-up: the library picks its kernels
            for _ in range(repeats):
                began = time.perf_counter()
                product()
                best = min(best, time.perf_counter() - began)
    return 2 * n**3 / best / 1e9


def count_flops(model: torch.nn.Module, size: int, batch: int = 1) -> int:
    """FLOPs of one forward pass (multiply-adds count two), by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.randn(batch, 3, size, size))
    return int(counter.get_total_flops())


def _time(run: Callable[[], Any], seconds: float, minimum: int) -> float:
    """Median seconds of ``run`` over at least ``minimum`` calls and about ``seconds``."""
    run()  # warm-up
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < minimum or time.perf_counter() - began < seconds:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


_CPU = torch.device("cpu")


def _artifact(net: torch.nn.Module, name: str, directory: str) -> str:
    """The network as a model artifact with its ONNX export, for the engines to load."""
    from pipeline.artifacts import ModelCard, save_model
    from pipeline.export import export_onnx

    head, _, backbone = name.partition("_")
    classes = [f"class_{i}" for i in range(21)]
    card = ModelCard(
        run_id="bench",
        architecture=head,
        backbone=backbone,
        num_classes=21,
        class_names=classes,
        model_options={"dropout": 0.5} if backbone == "vgg16" else {},
        normalization={"name": "imagenet"},
    )
    uri = str(Path(directory) / "model")
    save_model(net, card, uri)
    export_onnx(uri)
    return uri


def _variants(
    precisions: Sequence[str], compile: bool, installed: Sequence[str]
) -> list[tuple[str, str, str, bool]]:
    """(engine, precision, memory layout, compiled) of every row, torch first."""
    rows = [
        ("torch", precision, layout, compiled)
        for precision in precisions
        for layout in ("contiguous", "channels_last")
        for compiled in ((False, True) if compile else (False,))
    ]
    if "onnxruntime" in installed and "fp32" in precisions:
        rows.append(("onnxruntime", "fp32", "contiguous", False))
    if "openvino" in installed:
        rows += [("openvino", p, "contiguous", False) for p in precisions if p != "fp16"]
    return rows


def bench_model(
    *,
    model: str = "fcn8s_vgg16",
    size: int = 500,
    batch: int = 1,
    threads: int = 2,
    precisions: Sequence[str] = ("fp32", "bf16"),
    compile: bool = False,
    seconds: float = 3.0,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time the model in each engine x precision x layout (x compile); see the module
    docstring.

    Args:
        model: ``fcn.models.build_model`` name.
        size: Input side.
        batch: Images per forward pass.
        threads: torch threads.
        precisions: The precisions to run (``fp32``, ``bf16``, ``fp16``).
        compile: Also run each variant through ``torch.compile`` (its compile time is
            reported apart).
        seconds: About how long each variant is timed.
        echo: Where progress lines go.

    Returns:
        ``{"model", "size", "batch", "threads", "cpu", "native_bf16", "gflop", "peaks":
        {precision: GFLOP/s}, "rows": [{"engine", "precision", "layout", "compiled", "ms",
        "images_per_s", "gflops", "ratio", "compile_s"}]}``.
    """
    from pipeline.segment.config import SegmentCompute
    from pipeline.segment.engines import installed_backends, load_engine

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        net = build_model(model, 21).eval()
        flops = count_flops(net, size, batch)
        peaks = {p: matmul_peak(Compute(p).dtype) for p in precisions}
        echo(f"{model} at {size} px: {flops / 1e9:.1f} GFLOP a pass; peaks {peaks}")
        images = np.random.default_rng(0).integers(0, 256, (batch, 3, size, size), np.uint8)
        rows = []
        with tempfile.TemporaryDirectory(prefix="fcnpipe-bench-model-") as tmp:
            artifact = _artifact(net, model, tmp)
            for backend, precision, layout, compiled in _variants(
                precisions, compile, installed_backends()
            ):
                config = SegmentCompute(
                    backend=backend,  # type: ignore[arg-type]
                    precision=precision,  # type: ignore[arg-type]
                    memory_format=layout,  # type: ignore[arg-type]
                    compile=compiled,
                )
                began = time.perf_counter()
                engine = load_engine(
                    artifact, backend=backend, compute=config, device=_CPU, threads=threads
                )
                engine.labels(images)  # with compile: the compilation
                compile_s = time.perf_counter() - began if compiled else 0.0
                seconds_per = _time(functools.partial(engine.labels, images), seconds, minimum=3)
                gflops = flops / seconds_per / 1e9
                rows.append(
                    {
                        "engine": engine.name,
                        "precision": precision,
                        "layout": layout if backend == "torch" else "(runtime's)",
                        "compiled": compiled,
                        "ms": seconds_per * 1000,
                        "images_per_s": batch / seconds_per,
                        "gflops": gflops,
                        "ratio": gflops / peaks[precision],
                        "compile_s": compile_s,
                    }
                )
                echo(f"  {engine.describe()}: {rows[-1]['ms']:.0f} ms")
    finally:
        torch.set_num_threads(previous)
    capabilities = torch.cpu.get_capabilities()
    return {
        "model": model,
        "size": size,
        "batch": batch,
        "threads": threads,
        "cpu": str(capabilities.get("cpu_name") or "CPU"),
        "native_bf16": native_bf16(torch.device("cpu")),
        "amx": bool(capabilities.get("amx_bf16")),
        "gflop": flops / 1e9,
        "malloc_tuned": all(os.environ.get(k) == v for k, v in WORKER_ENV.items()),
        "peaks": peaks,
        "rows": rows,
    }


def format_bench_model(result: dict[str, Any]) -> str:
    """The table of :func:`bench_model`, fastest row marked."""
    bf16 = "native bf16 (AMX)" if result["amx"] else "native bf16 (AVX512-BF16)"
    if not result["native_bf16"]:
        bf16 = "no native bf16 (emulated)"
    lines = [
        f"{result['model']}, {result['size']} px, batch {result['batch']}, "
        f"{result['threads']} threads; {result['cpu']}, {bf16}; "
        f"{result['gflop']:.1f} GFLOP a pass; "
        f"malloc {'tuned (pipeline.cluster.WORKER_ENV)' if result['malloc_tuned'] else 'default'}",
        "matmul peak (4096^3 GEMM, BLAS or oneDNN): "
        + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in result["peaks"].items()),
        f"{'engine':<20}{'precision':<10}{'layout':<15}{'compiled':<10}{'ms':>9}{'img/s':>8}"
        f"{'GFLOP/s':>9}{'of peak':>9}",
    ]
    fastest = min(result["rows"], key=lambda r: r["ms"])
    for row in result["rows"]:
        compiled = f"yes ({row['compile_s']:.0f} s)" if row["compiled"] else "no"
        mark = "  <- fastest" if row is fastest else ""
        lines.append(
            f"{row['engine']:<20}{row['precision']:<10}{row['layout']:<15}{compiled:<10}"
            f"{row['ms']:>9.1f}{row['images_per_s']:>8.2f}{row['gflops']:>9.1f}"
            f"{row['ratio']:>9.2f}{mark}"
        )
    reference = result["rows"][0]
    lines.append(f"fastest / torch fp32 contiguous: {reference['ms'] / fastest['ms']:.2f}x")
    return "\n".join(lines)
