"""FCN-32s/16s/8s on every backbone: shapes, alignment, zero-initialised skips, weight loading.

The machine is small, so backbone work is shared: models are built once per backbone
(``_models``) and the backbone output for each test size is computed once (``_run``), by a
full forward of one head; the other heads run on that same backbone output, which is all
``FCN.forward`` does with it.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large, resnet18
from torchvision.ops.misc import SqueezeExcitation

from fcn.models import (
    BACKBONES,
    FCN,
    HEADS,
    FCNHead,
    build_model,
    fcn8s,
    fcn16s,
    fcn32s,
    load_backbone_weights,
)

pytestmark = pytest.mark.unit

M = TypeVar("M", bound=nn.Module)
NUM_CLASSES = 3
SIZES = [(1, 1), (7, 9), (333, 517), (500, 375)]
LIGHT = [name for name in BACKBONES if name != "vgg16"]


@functools.cache
def _models(backbone: str) -> dict[str, FCN]:
    """The three heads on one backbone, eval mode, zero-initialised score layers."""
    torch.manual_seed(0)
    if backbone == "vgg16":  # the bare head names default to vgg16; fcn32s keeps dropout 0.5
        return {
            "fcn32s": build_model("fcn32s", NUM_CLASSES).eval(),
            "fcn16s": build_model("fcn16s", NUM_CLASSES, dropout=0.0).eval(),
            "fcn8s": build_model("fcn8s", NUM_CLASSES, dropout=0.0).eval(),
        }
    return {head: build_model(f"{head}_{backbone}", NUM_CLASSES).eval() for head in HEADS}


@functools.cache
def _run(backbone: str, size: tuple[int, int]) -> tuple[str, dict[int, Tensor], Tensor]:
    """One full forward at ``size``: (head that ran it, backbone output, its logits)."""
    head = HEADS[SIZES.index(size) % len(HEADS)]  # every head runs end to end at some size
    model = _models(backbone)[head]
    captured: dict[int, Tensor] = {}
    hook = model.backbone.register_forward_hook(lambda _m, _i, out: captured.update(out))
    try:
        with torch.inference_mode():
            x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
            out = model(x)
    finally:
        hook.remove()
    return head, captured, out


@pytest.fixture(autouse=True, scope="module")
def _free_cached_models() -> Iterator[None]:
    yield
    _models.cache_clear()  # about 2 GB of VGG16s; the rest of the session needs none of it
    _run.cache_clear()


def _sub(module: nn.Module, name: str, kind: type[M]) -> M:
    """``module.<name>``, checked to be a ``kind``."""
    sub = module.get_submodule(name)
    assert isinstance(sub, kind), (name, type(sub))
    return sub


def _randomised(head: FCNHead, names: Iterable[str], seed: int = 2) -> FCNHead:
    """A copy of ``head`` whose named score layers hold random weights."""
    head = copy.deepcopy(head)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            for param in head.get_submodule(name).parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return head


def _upsample_only(head: FCNHead, features: Mapping[int, Tensor], size: Sequence[int]) -> Tensor:
    """``head`` with its skip branches removed: score_fr through every upsampler, same crops."""
    from fcn.models import _upsample  # = up(x, output_size=...): tested below

    score = head.score_fr(features[32])
    for up, stride in zip(head.upsamplers, head.skips, strict=False):
        if head.offsets is None:
            score = _upsample(up, score, features[stride].shape[-2:])
        else:
            score = up(score)
    final = head.upsamplers[-1]
    if head.offsets is None:
        return _upsample(final, score, size)
    offset = head.offsets[1]
    return final(score)[..., offset : offset + size[0], offset : offset + size[1]]


# -- shapes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("backbone", BACKBONES)
def test_output_is_input_sized_for_every_head(backbone: str, size: tuple[int, int]) -> None:
    ran, features, out = _run(backbone, size)
    assert out.shape == (1, NUM_CLASSES, *size), ran
    assert sorted(features) == [8, 16, 32]
    with torch.inference_mode():
        for head, model in _models(backbone).items():
            assert model.head(features, size).shape == (1, NUM_CLASSES, *size), head


def test_batches_and_train_mode() -> None:
    model = fcn8s(NUM_CLASSES, "resnet18").train()
    x = torch.randn(2, 3, 40, 56)
    loss = model(x).logsumexp(dim=1).mean()
    loss.backward()
    assert model(x).shape == (2, NUM_CLASSES, 40, 56)
    assert model.head.score_fr.weight.grad is not None
    assert _sub(model.head, "upscore2", nn.ConvTranspose2d).weight.grad is not None
    assert _sub(model.head, "upscore8", nn.ConvTranspose2d).weight.grad is None  # fixed


def test_rejects_non_image_input() -> None:
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        _models("mobilenet_v3_large")["fcn32s"](torch.zeros(1, 1, 8, 8))


# -- alignment ------------------------------------------------------------------------------


def _centre_map(layers: Iterable[nn.Module], a: float = 1.0, b: float = 0.0) -> tuple[float, float]:
    """Follow (a, b), "cell o is centred on input pixel a * o + b", through convs and pools.

    The calculus of caffe's coord_map.py: a layer with kernel k, stride s, padding p centres
    its output cell o on its input coordinate s * o - p + (k - 1) / 2; a deconvolution puts
    input cell i at output s * i - p + (k - 1) / 2.
    """

    def first(value: object) -> int:
        value = value[0] if isinstance(value, tuple) else value
        assert isinstance(value, int)
        return value

    for layer in layers:
        if isinstance(layer, nn.ConvTranspose2d):
            k, s, p = layer.kernel_size[0], layer.stride[0], first(layer.padding)
            a, b = a / s, b + a * (p - (k - 1) / 2) / s
        elif isinstance(layer, nn.Conv2d | nn.MaxPool2d):
            k, s, p = first(layer.kernel_size), first(layer.stride), first(layer.padding)
            a, b = a * s, b + a * ((k - 1) / 2 - p)
    return a, b


@pytest.mark.parametrize("backbone", BACKBONES)
def test_crop_offsets_follow_from_the_layers(backbone: str) -> None:
    """Every score map lands on the pixel it was computed for, and the output on the input.

    VGG16: derive the reference's offsets (19; 5, 27; 5, 9, 31) from the layers, as caffe's
    coord_map does. Light backbones: their stride-s cells sit on pixel s * i (see
    ``test_light_backbone_cells_are_centred``) and the heads need no crop at all.
    """
    models = _models(backbone)
    if backbone == "vgg16":
        bb = models["fcn8s"].backbone
        features = _sub(bb, "features", nn.Sequential)
        cells = {
            8: _centre_map(features[:17]),  # pool3
            16: _centre_map(features[:24]),  # pool4
            32: _centre_map([*features, bb.get_submodule("fc6"), bb.get_submodule("fc7")]),
        }
        assert cells[32] == (32, 12.5)
    else:
        cells = {s: (float(s), 0.0) for s in (8, 16, 32)}
    for head_name, model in models.items():
        head = model.head
        ups = head.upsamplers
        skip_offsets = head.offsets[0] if head.offsets else (0,) * len(head.skips)
        a, b = cells[32]
        for up, stride, offset in zip(ups, head.skips, skip_offsets, strict=False):
            a, b = _centre_map([up], a, b)
            a_skip, b_skip = cells[stride]
            assert a == a_skip, head_name
            assert offset == (b - b_skip) / a, head_name  # skip[o + offset] sits on up[o]
        a, b = _centre_map(ups[-1:], a, b)
        assert (a, -b) == (1, head.offsets[1] if head.offsets else 0), head_name


@pytest.mark.parametrize("backbone", LIGHT)
def test_light_backbone_cells_are_centred(backbone: str) -> None:
    """Experiment: the receptive field of stride-s cell i is centred on input pixel s * i.

    The rows whose gradient is non-zero are the cell's receptive field; one tall, one-pixel
    wide image per stride (batch items are independent in eval mode). Squeeze-excitation
    rescales channels by a global average, so it is switched off: it would make every
    receptive field the whole image without moving any centre.
    """
    torch.manual_seed(0)
    backbone_module = build_model(f"fcn32s_{backbone}", NUM_CLASSES).backbone.eval()
    for module in list(backbone_module.modules()):
        for name, child in module.named_children():
            if isinstance(child, SqueezeExcitation):
                setattr(module, name, nn.Identity())
    cells = {8: 41, 16: 21, 32: 11}
    x = torch.randn(3, 3, 700, 1, requires_grad=True)
    features = backbone_module(x)
    total = sum(features[s][k, :, cells[s], 0].sum() for k, s in enumerate(cells))
    assert isinstance(total, Tensor)
    (grad,) = torch.autograd.grad(total, x)
    for k, stride in enumerate(cells):
        rows = grad[k].abs().sum(dim=(0, 2)).nonzero().flatten()
        first, last = int(rows.min()), int(rows.max())
        assert first > 0 and last < 699, "receptive field clipped by the image border"
        assert (first + last) / 2 == stride * cells[stride], (stride, first, last)


@pytest.mark.parametrize("backbone", LIGHT)
@pytest.mark.parametrize("head_name", HEADS)
def test_light_heads_put_each_cell_on_its_pixel(backbone: str, head_name: str) -> None:
    """At input pixel (32 i, 32 j) the logits are exactly the sum of the score maps' cells
    centred there: score_fr[i, j] + score_pool4[2i, 2j] + score_pool3[4i, 4j]."""
    size = (333, 517)
    _, features, _ = _run(backbone, size)
    head = _models(backbone)[head_name].head
    names = ["score_fr", *(n for n in ("score_pool4", "score_pool3") if hasattr(head, n))]
    head = _randomised(head, names)
    with torch.inference_mode():
        out = head(features, size)
        expected = head.score_fr(features[32])
        for score, stride in zip(head.skip_scores, head.skips, strict=True):
            step = 32 // stride
            expected = expected + score(features[stride])[..., ::step, ::step]
    torch.testing.assert_close(out[..., ::32, ::32], expected, rtol=1e-5, atol=1e-5)


# -- zero-initialised skips and staged training ------------------------------------------


@pytest.mark.parametrize("backbone", ["vgg16", "resnet18"])
@pytest.mark.parametrize("head_name", ["fcn16s", "fcn8s"])
def test_zero_skips_add_nothing(backbone: str, head_name: str) -> None:
    """At initialisation FCN-16s/8s compute exactly the net without their skip branches."""
    size = (333, 517)
    _, features, _ = _run(backbone, size)
    head = _randomised(_models(backbone)[head_name].head, ["score_fr"])  # skips stay zero
    with torch.inference_mode():
        out = head(features, size)
        assert out.abs().amax() > 0
        assert torch.equal(out, _upsample_only(head, features, size))
        head = _randomised(head, ["score_pool4"], seed=3)  # a trained skip does change it
        assert not torch.equal(head(features, size), _upsample_only(head, features, size))


def _agreement(n: int, stride: int, fine_cells: int, vgg_centre: float | None) -> Tensor:
    """Pixels (along one axis) where 2x-then-(stride/2)x bilinear equals stride-x bilinear.

    Light backbones (odd kernels, align-corners style): the 2x stage keeps every coarse value
    and adds exact midpoints, so both are the same piecewise-linear function, except past the
    last coarse cell when the fine map has an odd number of cells (2 n_coarse - 1): the fine
    upsampler then fades to zero over stride/2 pixels instead of stride.
    VGG16 (even kernels, half-pixel): the 2x stage samples the coarse function at quarter
    offsets (0.25 and 0.75 of a cell), so the composition follows the straight line between
    two coarse centres only between those quarter points; within a quarter cell of a centre
    (at ``vgg_centre + stride * i``) the kink is cut off.
    """
    pos = torch.arange(n, dtype=torch.float64)
    if vgg_centre is not None:
        phase = (pos - vgg_centre) % stride
        return (phase >= stride / 4) & (phase <= 3 * stride / 4)
    coarse = -(-n // stride)
    if fine_cells == 2 * coarse:
        return torch.ones(n, dtype=torch.bool)
    return pos <= stride * (coarse - 1)


@pytest.mark.parametrize(
    ("backbone", "size"),
    [("vgg16", (333, 517)), ("resnet18", (333, 517)), ("resnet18", (500, 375))],
)
@pytest.mark.parametrize(("coarse", "fine"), [("fcn32s", "fcn16s"), ("fcn16s", "fcn8s")])
def test_finer_net_starts_as_its_coarser_parent(
    backbone: str, size: tuple[int, int], coarse: str, fine: str
) -> None:
    """The paper's staged training, stated exactly.

    FCN-16s is initialised from a trained FCN-32s (backbone and score_fr copied, score_pool4
    zero); FCN-8s from a trained FCN-16s (also score_pool4 copied, score_pool3 zero). The new
    net then predicts what its parent did *up to the upsampling*: the parent's single
    stride-x bilinear step is replaced by 2x then (stride/2)x, which agree on the pixels of
    ``_agreement`` (everywhere, for the light backbones, when the fine map has an even
    number of cells per axis) and differ elsewhere.
    """
    _, features, _ = _run(backbone, size)
    models = _models(backbone)
    trained = ["score_fr"] if coarse == "fcn32s" else ["score_fr", "score_pool4"]
    parent = _randomised(models[coarse].head, trained)  # stands for the trained parent
    child = copy.deepcopy(models[fine].head)
    for name in trained:  # the copy; the child's new skip stays zero
        child.get_submodule(name).load_state_dict(parent.get_submodule(name).state_dict())
    stride = 32 if coarse == "fcn32s" else 16
    centre = {"fcn32s": 12.5, "fcn16s": -11.5}[coarse] if backbone == "vgg16" else None
    fine_cells = features[stride // 2].shape[-2:]
    rows = _agreement(size[0], stride, fine_cells[0], centre)
    cols = _agreement(size[1], stride, fine_cells[1], centre)
    mask = rows[:, None] & cols[None, :]
    with torch.inference_mode():
        want, got = parent(features, size)[0], child(features, size)[0]
    scale = float(want.abs().amax())
    torch.testing.assert_close(got[:, mask], want[:, mask], rtol=0, atol=1e-5 * scale)
    if not mask.all():
        assert (got[:, ~mask] - want[:, ~mask]).abs().amax() > 1e-3 * scale


# -- names, options, flags ------------------------------------------------------------------


def test_build_model_names() -> None:
    assert HEADS == ("fcn32s", "fcn16s", "fcn8s")
    assert BACKBONES == ("vgg16", "resnet18", "resnet50", "mobilenet_v3_large")
    model = build_model("fcn8s_resnet18", 5)
    assert (model.head_name, model.backbone_name, model.num_classes) == ("fcn8s", "resnet18", 5)
    model = build_model("fcn16s", 4, backbone="mobilenet_v3_large")
    assert (model.head_name, model.backbone_name, model.num_classes) == (
        "fcn16s",
        "mobilenet_v3_large",
        4,
    )
    model = build_model("fcn32s_mobilenet_v3_large", 2, backbone="mobilenet_v3_large")
    assert model.backbone_name == "mobilenet_v3_large"
    assert _models("vgg16")["fcn8s"].backbone_name == "vgg16"  # built as plain "fcn8s"
    assert isinstance(fcn32s(2, "resnet18"), FCN) and isinstance(fcn16s(2, "resnet18"), FCN)


@pytest.mark.parametrize("name", ["fcn4s", "fcn8s_vgg19", "fcn8s_", "resnet18", "FCN8s_vgg16"])
def test_unknown_names_list_the_valid_ones(name: str) -> None:
    with pytest.raises(ValueError, match="unknown model") as err:
        build_model(name, 3)
    for valid in (*HEADS, *BACKBONES):
        assert valid in str(err.value)


def test_name_and_backbone_option_must_agree() -> None:
    with pytest.raises(ValueError, match="contradicts"):
        build_model("fcn8s_resnet18", 3, backbone="vgg16")
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'"):
        fcn8s(3, "resnet19")
    with pytest.raises(TypeError):
        build_model("fcn8s_resnet18", 3, dropuot=0.1)


@pytest.mark.parametrize(
    "options",
    [
        {"num_classes": 0},
        {"num_classes": True},
        {"num_classes": 2.0},
        {"dropout": -0.1},
        {"dropout": 1.0},
        {"dropout": True},
        {"learn_upsample": [True, False]},
        {"learn_upsample": [True, False, 1]},
        {"learn_upsample": "yes"},
    ],
)
def test_invalid_options_are_rejected(options: dict[str, object]) -> None:
    kwargs: dict[str, object] = {"num_classes": 3, "backbone": "resnet18", **options}
    with pytest.raises(ValueError, match=next(iter(options))):
        fcn8s(**kwargs)  # type: ignore[arg-type]


def test_learn_upsample_flags() -> None:
    defaults = {"fcn32s": [False], "fcn16s": [True, False], "fcn8s": [True, True, False]}
    for backbone in ("vgg16", "resnet18"):
        for head_name, model in _models(backbone).items():
            ups = model.head.upsamplers
            assert len(ups) == len(model.head.upsample_names)
            assert [up.weight.requires_grad for up in ups] == defaults[head_name]
            assert all(up.bias is None for up in ups)
    model = fcn8s(3, "resnet18", learn_upsample=(False, True, True))
    flags = [up.weight.requires_grad for up in model.head.upsamplers]
    assert model.head.upsample_names == ("upscore2", "upscore_pool4", "upscore8")
    assert flags == [False, True, True]
    assert fcn32s(3, "resnet18", learn_upsample=[True]).head.upsamplers[0].weight.requires_grad


def test_vgg16_layers_and_dropout() -> None:
    models = _models("vgg16")
    for head_name, p in (("fcn32s", 0.5), ("fcn8s", 0.0)):
        bb = models[head_name].backbone
        assert _sub(bb, "drop6", nn.Dropout).p == p and _sub(bb, "drop7", nn.Dropout).p == p
    features = _sub(bb, "features", nn.Sequential)
    assert _sub(features, "0", nn.Conv2d).padding == (100, 100)
    convs = [m for m in features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and all(c.padding == (1, 1) for c in convs[1:])
    pools = [m for m in features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 5 and all(m.ceil_mode for m in pools)
    fc6, fc7 = _sub(bb, "fc6", nn.Conv2d), _sub(bb, "fc7", nn.Conv2d)
    assert (fc6.weight.shape, fc6.padding) == ((4096, 512, 7, 7), (0, 0))
    assert fc7.weight.shape == (4096, 4096, 1, 1)
    kernels = {h: [up.kernel_size[0] for up in m.head.upsamplers] for h, m in models.items()}
    assert kernels == {"fcn32s": [64], "fcn16s": [4, 32], "fcn8s": [4, 4, 16]}
    strides = {h: [up.stride[0] for up in m.head.upsamplers] for h, m in models.items()}
    assert strides == {"fcn32s": [32], "fcn16s": [2, 16], "fcn8s": [2, 2, 8]}


def test_backbone_and_head_split_the_parameters() -> None:
    model = _models("resnet50")["fcn8s"]
    backbone = {id(p) for p in model.backbone.parameters()}
    head = {id(p) for p in model.head.parameters()}
    assert backbone and head and not backbone & head
    assert backbone | head == {id(p) for p in model.parameters()}
    for name, param in model.head.named_parameters():
        if name.startswith("score"):
            assert not param.any(), name  # every score layer starts at zero (the paper)


# -- loading torchvision weights ------------------------------------------------------------


_TORCHVISION = {"resnet18": resnet18, "mobilenet_v3_large": mobilenet_v3_large}


@pytest.mark.parametrize("backbone", list(_TORCHVISION))  # resnet50: same code as resnet18
def test_load_backbone_weights_round_trip(backbone: str, tmp_path: Path) -> None:
    torch.manual_seed(5)
    reference = _TORCHVISION[backbone](weights=None)
    with torch.no_grad():  # BN statistics too, so buffers are checked as well
        for name, buf in reference.named_buffers():
            if "running" in name:
                buf.uniform_(0.5, 1.5)
    path = tmp_path / f"{backbone}.pth"
    torch.save(reference.state_dict(), path)
    model = fcn8s(3, backbone)
    report = load_backbone_weights(model, str(path) if backbone == "resnet18" else path)
    ignored = ("fc.weight", "fc.bias") if backbone.startswith("resnet") else None
    if ignored:
        assert report.ignored == ignored
    else:
        assert report.ignored and all(k.startswith("classifier.") for k in report.ignored)
    assert report.missing == ()
    ours = model.backbone.state_dict()
    assert set(report.loaded) == set(ours)
    for key, value in reference.state_dict().items():
        if key in ours:
            assert torch.equal(ours[key], value), key
    with path.open("rb") as fh:  # a binary file object works too
        assert load_backbone_weights(fcn32s(3, backbone), fh).loaded == report.loaded


def test_load_backbone_weights_shape_mismatch_names_the_key() -> None:
    model = fcn16s(3, "resnet18")
    state = resnet18(weights=None).state_dict()
    state["layer3.0.conv1.weight"] = torch.zeros(256, 64, 3, 3)
    before = model.backbone.get_parameter("conv1.weight").clone()
    with pytest.raises(ValueError, match=r"layer3\.0\.conv1\.weight.*\(256, 64, 3, 3\)"):
        load_backbone_weights(model, state)
    assert torch.equal(model.backbone.get_parameter("conv1.weight"), before)  # nothing copied


def test_load_backbone_weights_rejects_foreign_sources(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no key of the source fits"):
        load_backbone_weights(fcn32s(3, "mobilenet_v3_large"), resnet18(weights=None).state_dict())
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="expected a state dict"):
        load_backbone_weights(fcn32s(3, "resnet18"), path)


def test_load_backbone_weights_vgg16_goes_through_surgery() -> None:
    model = _models("vgg16")["fcn8s"]  # shared: its weights are put back afterwards
    gen = torch.Generator().manual_seed(6)
    state = {
        "features.28.bias": torch.randn(512, generator=gen),
        "classifier.3.weight": torch.randn(4096, 4096, generator=gen) * 0.01,
        "classifier.3.bias": torch.randn(4096, generator=gen),
        "classifier.6.weight": torch.randn(1000, 4096, generator=gen),
    }
    touched = ("features.28.bias", "fc7.weight", "fc7.bias")
    saved = {key: model.backbone.state_dict()[key].clone() for key in touched}
    try:
        report = load_backbone_weights(model, state)
        assert torch.equal(
            model.backbone.get_parameter("fc7.weight")[:, :, 0, 0], state["classifier.3.weight"]
        )
        assert torch.equal(
            model.backbone.get_parameter("features.28.bias"), state["features.28.bias"]
        )
    finally:
        model.backbone.load_state_dict(saved, strict=False)
    assert report.loaded == ("features.28.bias", "classifier.3.weight", "classifier.3.bias")
    assert report.ignored == ("classifier.6.weight",)
    assert "fc6.weight" in report.missing and "features.0.weight" in report.missing


@pytest.mark.parametrize("factor", [2, 8, 16, 32])
@pytest.mark.parametrize("size", [(7, 9), (333, 517), (500, 375)])
def test_upsampling_to_a_size_needs_no_size_dependent_padding(
    factor: int, size: tuple[int, int]
) -> None:
    # The heads crop the largest output (output_padding = stride - 1) rather than pass a
    # size-dependent output_padding (output_size=), so the graph exports with symbolic sizes;
    # the values are the same.
    from fcn.models import _upsample

    up = nn.ConvTranspose2d(3, 3, 2 * factor - 1, stride=factor, padding=factor - 1, bias=False)
    cells = [(side + factor - 1) // factor for side in size]
    x = torch.randn(1, 3, *cells)
    with torch.inference_mode():
        expected = up(x, output_size=list(size))
        got = _upsample(up, x, size)
    assert got.shape == expected.shape == (1, 3, *size)
    assert torch.allclose(got, expected, atol=1e-5)
