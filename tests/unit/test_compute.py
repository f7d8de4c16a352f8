"""The precision policy (pipeline.compute, fcn.engine.Compute), without Ray.

- ``auto`` on a CPU picks the fastest measured candidate, bf16 only where oneDNN runs it
  natively, fp32 contiguous always among them (so never slower than it); explicit choices are
  taken as given; probes are cached per machine and model;
- a small trained FCN segments alike in every precision and layout this machine runs: bf16
  label maps agree with fp32 on >= 99.5 % of pixels and the mean IoU within 0.005, fp32
  channels_last on >= 99.9 %; the confusion matrix stays int64 whatever the precision.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fcn.engine import FP32, Compute, evaluate, predict
from fcn.metrics import ConfusionMatrix
from fcn.models import build_model
from fcn.optim import build_optimizer
from fcn.synthetic import CLASS_NAMES, make_sample
from fcn.transforms import eval_transform
from pipeline import compute
from pipeline.compute import ComputeConfig, inference_probe, resolve
from tests.models import trained_fcn

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FCNPIPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _probe(times_ms: dict[str, float], calls: list[str]) -> object:
    def probe(candidate: Compute) -> float:
        calls.append(candidate.name)
        return times_ms[candidate.name] / 1000

    return probe


TIMES = {
    "fp32": 100.0,
    "fp32 + channels_last": 60.0,
    "bf16": 70.0,
    "bf16 + channels_last": 35.0,
}


def test_auto_takes_the_fastest_and_bf16_only_where_native(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(compute, "native_bf16", lambda device: True)
    plan = resolve(ComputeConfig(), CPU, probe=_probe(TIMES, calls), key="m")  # type: ignore[arg-type]
    assert plan.compute == Compute("bf16", channels_last=True)
    assert set(calls) == set(TIMES) and plan.timings_ms == pytest.approx(TIMES)
    assert "35 ms a pass vs fp32 100 ms" in plan.describe()

    calls.clear()
    monkeypatch.setattr(compute, "native_bf16", lambda device: False)
    plan = resolve(ComputeConfig(), CPU, probe=_probe(TIMES, calls), key="m2")  # type: ignore[arg-type]
    assert plan.compute == Compute("fp32", channels_last=True)
    assert set(calls) == {"fp32", "fp32 + channels_last"}  # emulated bf16: never a candidate


def test_auto_never_picks_something_slower_than_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compute, "native_bf16", lambda device: True)
    slow = {name: 200.0 for name in TIMES} | {"fp32": 90.0}
    plan = resolve(ComputeConfig(), CPU, probe=_probe(slow, []), key="m")  # type: ignore[arg-type]
    assert plan.compute == FP32


def test_explicit_choices_are_not_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compute, "native_bf16", lambda device: False)
    calls: list[str] = []
    config = ComputeConfig(precision="bf16", memory_format="channels_last")
    plan = resolve(config, CPU, probe=_probe(TIMES, calls), key="m")  # type: ignore[arg-type]
    assert plan.compute == Compute("bf16", channels_last=True) and not calls
    # Only the layout is open: the two layouts of the asked precision are measured.
    config = ComputeConfig(precision="fp32")
    plan = resolve(config, CPU, probe=_probe(TIMES, calls), key="m")  # type: ignore[arg-type]
    assert plan.compute == Compute("fp32", channels_last=True)
    assert calls == ["fp32", "fp32 + channels_last"]


def test_probes_are_cached_per_machine_and_model(
    monkeypatch: pytest.MonkeyPatch, cache_dir: Path
) -> None:
    monkeypatch.setattr(compute, "native_bf16", lambda device: True)
    calls: list[str] = []
    resolve(ComputeConfig(), CPU, probe=_probe(TIMES, calls), key="model-a")  # type: ignore[arg-type]
    assert len(calls) == 4
    again = resolve(ComputeConfig(), CPU, probe=_probe(TIMES, calls), key="model-a")  # type: ignore[arg-type]
    assert len(calls) == 4 and again.compute == Compute("bf16", channels_last=True)
    resolve(ComputeConfig(), CPU, probe=_probe(TIMES, calls), key="model-b")  # type: ignore[arg-type]
    assert len(calls) == 8  # another model: measured again
    entries = json.loads((cache_dir / "compute.json").read_text())
    assert len(entries) == 2 and all("torch " in key for key in entries)


def test_the_real_probe_times_the_model_without_changing_it() -> None:
    model = build_model("fcn32s_resnet18", 3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seconds = inference_probe(model, (32, 32))(Compute("fp32", channels_last=True))
    assert seconds > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    conv_weight = next(p for p in model.parameters() if p.ndim == 4)
    assert conv_weight.is_contiguous()  # the probe's channels_last copy left it NCHW


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    return trained_fcn()


@pytest.mark.parametrize(
    ("candidate", "agreement", "iou_gap"),
    [
        (Compute("fp32", channels_last=True), 0.999, 0.002),
        (Compute("bf16"), 0.995, 0.005),
        (Compute("bf16", channels_last=True), 0.995, 0.005),
    ],
    ids=lambda value: value.name if isinstance(value, Compute) else str(value),
)
def test_label_maps_agree_across_precisions(
    trained: torch.nn.Module, candidate: Compute, agreement: float, iou_gap: float
) -> None:
    to_input = eval_transform()
    val = [make_sample(i, size=96, seed=2) for i in range(8)]  # full images, another size
    reference = FP32.model(trained)
    fp32 = [predict(reference, to_input(img, m)[0]) for img, m in val]
    fp32_cm = evaluate(reference, (to_input(img, m) for img, m in val), len(CLASS_NAMES))
    model = candidate.model(trained)
    try:
        other = [predict(model, to_input(img, m)[0], candidate) for img, m in val]
        cm = evaluate(
            model, (to_input(img, m) for img, m in val), len(CLASS_NAMES), compute=candidate
        )
    finally:
        FP32.model(trained)
    same = sum(int((a == b).sum()) for a, b in zip(fp32, other, strict=True))
    total = sum(a.numel() for a in fp32)
    assert same / total >= agreement, same / total
    assert cm.matrix.dtype == torch.int64 and cm.matrix.sum() == fp32_cm.matrix.sum()
    gap = abs(cm.scores()["mean_iou"] - fp32_cm.scores()["mean_iou"])
    assert gap <= iou_gap, gap
    # The model learned something: an all-background answer scores far lower.
    baseline = ConfusionMatrix(len(CLASS_NAMES))
    for _, mask in val:
        target = torch.from_numpy(mask.astype(np.int64))
        baseline.update(torch.zeros_like(target), target)
    assert fp32_cm.scores()["mean_iou"] > baseline.scores()["mean_iou"] + 0.1


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_training_step_and_agreement(trained: torch.nn.Module, precision: str) -> None:
    # On a GPU: auto is bf16 + channels_last where supported; fp16 steps through a scaler.
    device = torch.device("cuda")
    plan = resolve(ComputeConfig(), device)
    assert plan.channels_last and plan.precision in ("bf16", "fp32")
    candidate = Compute(precision, channels_last=True)
    model = candidate.model(build_model("fcn8s_resnet18", len(CLASS_NAMES)).to(device)).train()
    optimizer = build_optimizer(model, "sgd", lr=1e-2)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    images = torch.randn(2, 3, 64, 64, device=device)
    masks = torch.randint(0, len(CLASS_NAMES), (2, 64, 64), device=device)
    from fcn.engine import forward_backward

    loss = forward_backward(model, images, masks, compute=candidate, scaler=scaler)
    assert torch.isfinite(loss)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    reference = FP32.model(trained).to(device)
    to_input = eval_transform()
    val = [make_sample(i, size=96, seed=2) for i in range(4)]
    gpu_model = candidate.model(trained)
    same = total = 0
    for image, mask in val:
        x = to_input(image, mask)[0].to(device)
        a = predict(reference, x)
        b = predict(gpu_model, x, candidate)
        same, total = same + int((a == b).sum()), total + a.numel()
    FP32.model(trained).cpu()
    assert same / total >= 0.995


# -- engines ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(trained: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The trained model as an artifact with its ONNX export."""
    from pipeline.artifacts import ModelCard, save_model
    from pipeline.export import export_onnx

    uri = str(tmp_path_factory.mktemp("artifact") / "model")
    card = ModelCard(
        run_id="small",
        architecture="fcn8s",
        backbone="resnet18",
        num_classes=len(CLASS_NAMES),
        class_names=list(CLASS_NAMES),
        normalization={"name": "imagenet"},
    )
    save_model(FP32.model(trained), card, uri)
    export_onnx(uri)
    return uri


def _engine_labels(engine: object, val: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    return [
        engine.labels(np.ascontiguousarray(image.transpose(2, 0, 1)[None]))[0]  # type: ignore[attr-defined]
        for image, _ in val
    ]


def _mean_iou(labels: list[np.ndarray], val: list[tuple[np.ndarray, np.ndarray]]) -> float:
    cm = ConfusionMatrix(len(CLASS_NAMES))
    for label, (_, mask) in zip(labels, val, strict=True):
        cm.update(torch.from_numpy(label.astype(np.int64)), torch.from_numpy(mask.astype(np.int64)))
    return float(cm.scores()["mean_iou"])


ENGINES = [
    ("onnxruntime", "fp32", 0.999, 0.002),
    ("openvino", "fp32", 0.999, 0.002),
    ("openvino", "bf16", 0.995, 0.005),
    ("torch", "bf16", 0.995, 0.005),
]


@pytest.mark.parametrize(("backend", "precision", "agreement", "iou_gap"), ENGINES)
def test_every_engine_segments_like_torch_fp32(
    exported: str, backend: str, precision: str, agreement: float, iou_gap: float
) -> None:
    from pipeline.segment.config import SegmentCompute
    from pipeline.segment.engines import load_engine

    val = [make_sample(i, size=96, seed=2) for i in range(8)]
    reference = load_engine(
        exported,
        backend="torch",
        compute=SegmentCompute(precision="fp32", memory_format="contiguous"),
        device=CPU,
        threads=2,
    )
    engine = load_engine(
        exported,
        backend=backend,
        compute=SegmentCompute(precision=precision),  # type: ignore[arg-type]
        device=CPU,
        threads=2,
    )
    assert engine.precision == precision and engine.name.startswith(backend)
    expected, got = _engine_labels(reference, val), _engine_labels(engine, val)
    same = sum(int((a == b).sum()) for a, b in zip(expected, got, strict=True))
    assert same / sum(a.size for a in expected) >= agreement
    assert abs(_mean_iou(got, val) - _mean_iou(expected, val)) <= iou_gap


def test_auto_engine_is_the_fastest_measured_and_says_so(
    exported: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.segment import engines
    from pipeline.segment.config import SegmentCompute

    seconds = {"torch": 0.030, "onnxruntime": 0.010, "openvino": 0.020}
    monkeypatch.setattr(engines, "_engine_seconds", lambda build, name, side: seconds[name])
    engine = engines.load_engine(
        exported, backend="auto", compute=SegmentCompute(), device=CPU, threads=2
    )
    assert engine.name.startswith("onnxruntime")
    assert "auto engine, measured torch 30 ms, onnxruntime 10 ms, openvino 20 ms" in (
        engine.describe()
    )


def test_bad_engine_inputs_are_one_line(
    exported: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from pipeline.artifacts import ArtifactError
    from pipeline.errors import ConfigError
    from pipeline.export import OnnxMismatch
    from pipeline.segment import engines
    from pipeline.segment.config import SegmentCompute

    def load(uri: str, backend: str, **compute: str) -> object:
        config = SegmentCompute(**compute)  # type: ignore[arg-type]
        return engines.load_engine(uri, backend=backend, compute=config, device=CPU, threads=1)

    # A changed ONNX file: refused, naming the object and the fix.
    tampered = str(tmp_path / "tampered")
    shutil.copytree(exported, tampered)
    onnx = Path(tampered) / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\0")
    with pytest.raises(OnnxMismatch, match=r"model.onnx: its SHA-256 .* \(`fcnpipe export"):
        load(tampered, "onnxruntime")
    # An artifact without an export: the fix is `fcnpipe export`.
    bare = str(tmp_path / "bare")
    shutil.copytree(exported, bare)
    card = json.loads((Path(bare) / "model.json").read_text())
    card["onnx"] = None
    (Path(bare) / "model.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="has no ONNX export: run `fcnpipe export"):
        load(bare, "openvino")
    # An engine that is not installed, and a precision an engine cannot run.
    monkeypatch.setattr(engines, "installed_backends", lambda: ["torch", "onnxruntime"])
    with pytest.raises(ConfigError, match=r"openvino: its package .* is not installed"):
        load(exported, "openvino")
    with pytest.raises(ConfigError, match="onnxruntime runs fp32 on a CPU"):
        load(exported, "onnxruntime", precision="bf16")
