"""Bilinear kernels against the reference formula, and the VGG16 fc -> conv transplant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torchvision.models import VGG, vgg16

from fcn.models import FCN, fcn32s
from fcn.surgery import LoadReport, bilinear_kernel, transplant_vgg16_classifier, upsample_filt

pytestmark = pytest.mark.unit

M = TypeVar("M", bound=nn.Module)


def _sub(module: nn.Module, name: str, kind: type[M]) -> M:
    sub = module.get_submodule(name)
    assert isinstance(sub, kind), (name, type(sub))
    return sub


def reference_upsample_filt(size: int) -> np.ndarray:
    """Verbatim from shelhamer/fcn.berkeleyvision.org surgery.py."""
    factor = (size + 1) // 2
    center: float  # (the one line added, for mypy)
    if size % 2 == 1:  # noqa: SIM108 (kept verbatim)
        center = factor - 1
    else:
        center = factor - 0.5
    og = np.ogrid[:size, :size]
    return (1 - abs(og[0] - center) / factor) * (1 - abs(og[1] - center) / factor)


# -- bilinear kernels -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 7, 8, 15, 16, 31, 32, 63, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_bilinear_kernel_is_the_reference_filter_on_the_diagonal(channels: int, size: int) -> None:
    kernel = bilinear_kernel(channels, size)
    assert kernel.shape == (channels, channels, size, size)
    assert kernel.dtype == torch.float32
    expected = torch.from_numpy(reference_upsample_filt(size))
    torch.testing.assert_close(upsample_filt(size), expected, rtol=0, atol=1e-12)
    for i in range(channels):
        for j in range(channels):
            if i == j:
                torch.testing.assert_close(kernel[i, j], expected.float(), rtol=0, atol=1e-7)
            else:
                assert not kernel[i, j].any(), (i, j)


@pytest.mark.parametrize(("channels", "size"), [(0, 4), (2, 0)])
def test_bilinear_kernel_rejects_empty_shapes(channels: int, size: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        bilinear_kernel(channels, size)


def _ramp(n: int, m: int) -> Tensor:
    """An affine function of (row, col), which bilinear interpolation reproduces exactly."""
    rows = torch.arange(n, dtype=torch.float64)[:, None]
    cols = torch.arange(m, dtype=torch.float64)[None, :]
    return (3 * rows - 2 * cols + 1)[None, None]


@pytest.mark.parametrize("factor", [2, 8, 16, 32])
def test_odd_kernel_interpolates_through_the_cell_centres(factor: int) -> None:
    """Kernel 2f - 1, stride f, padding f - 1 (the light backbones' heads): cell i lands on
    output pixel f * i with weight 1, linear in between (align-corners style)."""
    size = 2 * factor - 1
    up = nn.ConvTranspose2d(2, 2, size, stride=factor, padding=factor - 1, bias=False).double()
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(2, size))
    x = torch.cat([_ramp(4, 5), -_ramp(4, 5)], dim=1)
    out = up(x)
    assert out.shape[-2:] == (3 * factor + 1, 4 * factor + 1)
    rows = torch.arange(out.shape[-2], dtype=torch.float64)[:, None] / factor
    cols = torch.arange(out.shape[-1], dtype=torch.float64)[None, :] / factor
    expected = 3 * rows - 2 * cols + 1
    torch.testing.assert_close(out[0, 0], expected)
    torch.testing.assert_close(out[0, 1], -expected)


@pytest.mark.parametrize("factor", [2, 8, 32])
def test_even_kernel_puts_cells_half_a_pixel_off(factor: int) -> None:
    """Kernel 2f, stride f (the reference): cell i lands on output f * i + f - 0.5, so between
    the first and last cells the output is the input sampled at (o - f + 0.5) / f."""
    size = 2 * factor
    up = nn.ConvTranspose2d(1, 1, size, stride=factor, bias=False).double()
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(1, size))
    n = 4
    out = up(_ramp(n, n))[0, 0]
    inner = torch.arange(factor, factor * (n - 1) + factor - 1)  # between cells 0 and n - 1
    where = (inner.double() - factor + 0.5) / factor
    expected = 3 * where[:, None] - 2 * where[None, :] + 1
    torch.testing.assert_close(out[inner][:, inner], expected)


# -- fc -> conv transplant ------------------------------------------------------------------


@pytest.fixture(scope="module")
def torchvision_vgg16() -> VGG:
    torch.manual_seed(0)
    return vgg16(weights=None).eval()


@pytest.fixture(scope="module")
def transplanted(torchvision_vgg16: VGG) -> Iterator[tuple[FCN, LoadReport]]:
    torch.manual_seed(1)
    model = fcn32s(3, "vgg16").eval()
    report = transplant_vgg16_classifier(model, torchvision_vgg16.state_dict())
    yield model, report


def test_transplanted_fc7_matches_torchvision(
    torchvision_vgg16: VGG, transplanted: tuple[FCN, LoadReport]
) -> None:
    """At 224x224 the FCN's fc7 (1x1 map) equals torchvision's fc7 activations.

    The FCN pads conv1_1 by 100, and no window of its output reproduces torchvision's
    computation: the 224 image starts at an odd offset (99) of the pool1 grid, and the zero
    padding torchvision gives conv1_2 and later layers at the border becomes, in the FCN,
    activations computed from zeros. So the comparison sets conv1_1's padding to 1, as in
    torchvision, and checks everything else: 13 convs, ceil-mode pools (exact at 224) and
    the reshaped fc6/fc7 against classifier[:5] (fc6, ReLU, dropout, fc7, ReLU) in eval mode.
    """
    model, _ = transplanted
    conv1_1 = _sub(model.backbone, "features.0", nn.Conv2d)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    conv1_1.padding = (1, 1)
    try:
        with torch.inference_mode():
            fc7 = model.backbone(x)[32]
    finally:
        conv1_1.padding = (100, 100)
    with torch.inference_mode():
        tv = torchvision_vgg16
        expected = tv.classifier[:5](torch.flatten(tv.avgpool(tv.features(x)), 1))
    assert fc7.shape == (2, 4096, 1, 1)
    scale = float(expected.abs().amax())
    assert scale > 0 and int((expected > 0).sum()) > 1000  # a real, non-trivial activation
    torch.testing.assert_close(fc7[:, :, 0, 0], expected, rtol=1e-4, atol=1e-4 * scale)


def test_transplant_report(transplanted: tuple[FCN, LoadReport]) -> None:
    model, report = transplanted
    assert report.ignored == ("classifier.6.weight", "classifier.6.bias")
    assert report.missing == ()
    assert "classifier.0.weight" in report.loaded and "classifier.3.bias" in report.loaded
    features = [k for k in report.loaded if k.startswith("features.")]
    assert len(features) == 26  # 13 convs, weight and bias
    assert len(report.loaded) == 30
    assert model.backbone.get_parameter("fc6.weight").shape == (4096, 512, 7, 7)


def test_transplant_checks_shapes_before_copying(
    torchvision_vgg16: VGG, transplanted: tuple[FCN, LoadReport]
) -> None:
    model, _ = transplanted
    state = dict(torchvision_vgg16.state_dict())
    before = model.backbone.get_parameter("features.0.weight").clone()
    state["features.0.weight"] = torch.zeros(64, 3, 3, 3)
    state["classifier.0.weight"] = torch.zeros(4096, 100)
    with pytest.raises(ValueError, match=r"classifier\.0\.weight.*\(4096, 100\)"):
        transplant_vgg16_classifier(model, state)
    state["classifier.0.weight"] = torchvision_vgg16.state_dict()["classifier.0.weight"]
    state["features.2.weight"] = torch.zeros(64, 64, 5, 5)
    with pytest.raises(ValueError, match=r"features\.2\.weight.*\(64, 64, 5, 5\)"):
        transplant_vgg16_classifier(model, state)
    assert torch.equal(model.backbone.get_parameter("features.0.weight"), before)


def test_transplant_needs_a_vgg16_fcn() -> None:
    with pytest.raises(ValueError, match="VGG16 backbone"):
        transplant_vgg16_classifier(fcn32s(3, "resnet18"), {})


# ----------------------------------------------------------------------------- staged training


def test_fcn16s_from_fcn32s_copies_shared_layers_and_keeps_skips_zero() -> None:
    from fcn.models import build_model
    from fcn.surgery import transplant_fcn

    torch.manual_seed(0)
    coarse = build_model("fcn32s_resnet18", 4)
    with torch.no_grad():  # as if trained: non-zero scores
        coarse.head.score_fr.weight.normal_()
        coarse.head.score_fr.bias.normal_()
    fine = build_model("fcn16s_resnet18", 4)
    report = transplant_fcn(fine, coarse.state_dict())
    assert "head.score_fr.weight" in report.loaded
    assert "head.upscore.weight" in report.ignored  # 32s's final upsampler has no twin
    assert "head.score_pool4.weight" in report.missing
    fine_state, coarse_state = fine.state_dict(), coarse.state_dict()
    for key in report.loaded:
        assert torch.equal(fine_state[key], coarse_state[key]), key
    assert not fine.head.score_pool4.weight.any()  # zero: starts as the coarse net

    fine8 = build_model("fcn8s_resnet18", 4)
    report8 = transplant_fcn(fine8, fine.state_dict())
    assert {"head.score_pool4.weight", "head.upscore2.weight"} <= set(report8.loaded)
    assert "head.score_pool3.weight" in report8.missing


def test_staged_init_rejects_another_class_count() -> None:
    from fcn.models import build_model
    from fcn.surgery import transplant_fcn

    with pytest.raises(ValueError, match=r"head\.score_fr\.weight: shape"):
        transplant_fcn(
            build_model("fcn16s_resnet18", 4), build_model("fcn32s_resnet18", 5).state_dict()
        )
    with pytest.raises(ValueError, match="no key of the source"):
        transplant_fcn(build_model("fcn16s_resnet18", 4), {"x": torch.zeros(1)})
