"""FCN-32s, FCN-16s and FCN-8s (Long, Shelhamer & Darrell, CVPR 2015) on several backbones.

Every model maps (N, 3, H, W) images, normalised as the backbone's torchvision ImageNet
weights expect (RGB, ImageNet mean/std), to (N, num_classes, H, W) logits for any H, W >= 1.
Score layers start at zero, as in the paper ("we zero-initialize the class scoring layer"):
a fresh model outputs zeros, and a zero skip adds nothing, so FCN-16s/8s start as their
coarser parent up to how they upsample (tests/unit/test_models.py states where they agree).
In train mode the BatchNorm backbones need more than one value per channel at stride 32:
a batch of one image of at most 32x32 pixels fails there, as any torchvision ResNet does.

Alignment, VGG16 (``centred=False``): the paper's net, layer for layer as
``voc-fcn{32,16,8}s/net.py``: conv1_1 padded by 100, ceil-mode 2x2 pools, fc6/fc7 as 7x7 and
1x1 convolutions, deconvolutions with kernel 2f / stride f, and the reference's crops. As
caffe's coord_map computes, the fc7 cell i is centred on input pixel 32 i + 12.5, pool4's on
16 i - 91.5, pool3's on 8 i - 95.5, and a deconvolution puts its input cell i on output
f i + f - 0.5; cropping at the reference's offsets (19; 5, 27; 5, 9, 31) lines them up.

Alignment, ResNets and MobileNetV3 (``centred=True``): they use odd kernels with "same"
padding (k - 1) / 2 everywhere, stride-2 layers included, so the receptive field of cell i of
a stride-s map is centred on input pixel s i exactly, and the map has ceil(H / s) cells. The
heads therefore upsample by f with the odd bilinear kernel 2f - 1, stride f and padding f - 1:
cell i lands on output pixel f i with weight 1, linear in between (align-corners style), and
asking for the wanted output size (output_padding 0 .. f - 1) yields exactly the next map's
ceil(H / (s / f)) cells, or the input's H rows, with no crop: output pixel o is input pixel o.
The reference's even kernel 2f would put cell i on f i + f - 0.5, a half-cell shift that no
integer crop removes (8 px for a 2x step onto stride 16). Past the last cell centre an
upsampler fades the scores towards zero, as the reference's deconvolutions do at image
borders (after the final one every class fades alike, so the arg-max is the edge's).

Usage::

    model = build_model("fcn8s_resnet18", num_classes=21)
    report = load_backbone_weights(model, "resnet18-imagenet.pth")
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, BinaryIO, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large, resnet18, resnet50
from torchvision.models.resnet import ResNet

from fcn.names import BACKBONES, HEADS
from fcn.surgery import (
    LoadReport,
    bilinear_kernel,
    copy_matching,
    transplant_vgg16_classifier,
)

# Strides of the skip features each head fuses, coarse to fine, after the stride-32 scores.
_SKIPS: dict[str, tuple[int, ...]] = {"fcn32s": (), "fcn16s": (16,), "fcn8s": (16, 8)}
_SKIP_NAMES = {16: "score_pool4", 8: "score_pool3"}
# Upsampling layers of each head, in the order they run (the reference's names).
_UPSAMPLERS: dict[str, tuple[str, ...]] = {
    "fcn32s": ("upscore",),
    "fcn16s": ("upscore2", "upscore16"),
    "fcn8s": ("upscore2", "upscore_pool4", "upscore8"),
}
# VGG16 crop offsets of voc-fcn*s/net.py: (offset of each skip score map, final offset);
# see the module docstring (tests/unit/test_models.py re-derives them from the layers).
_VGG16_OFFSETS: dict[str, tuple[tuple[int, ...], int]] = {
    "fcn32s": ((), 19),
    "fcn16s": ((5,), 27),
    "fcn8s": ((5, 9), 31),
}


def _zero_bias(conv: nn.Conv2d) -> None:
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class _Backbone(nn.Module):
    """Feature extractor returning ``{8: ..., 16: ..., 32: ...}`` maps by stride."""

    channels: dict[int, int]
    centred: bool  # True: stride-s cell i is centred on input pixel s * i (module docstring)

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        raise NotImplementedError


# VGG16 conv widths, 0 for a max pool; pool3 and pool4 sit at indices 16 and 23 of ``features``.
_VGG16_CFG = (64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0)
_VGG16_TAPS = {16: 8, 23: 16}  # index in ``features`` -> stride


class _VGG16Backbone(_Backbone):
    """VGG16 as the paper's FCN: ``features`` with torchvision's indices, then fc6 and fc7.

    Args:
        dropout: p of the dropout after fc6 and after fc7.
    """

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.channels = {8: 256, 16: 512, 32: 4096}
        self.centred = False
        layers: list[nn.Module] = []
        in_channels = 3
        for width in _VGG16_CFG:
            if width == 0:
                layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))  # caffe rounds up
            else:
                # conv1_1 pads by 100 so that any input, down to 1x1, survives to fc6.
                pad = 100 if not layers else 1
                layers += [nn.Conv2d(in_channels, width, 3, padding=pad), nn.ReLU(inplace=True)]
                in_channels = width
        self.features = nn.Sequential(*layers)
        self.fc6 = nn.Conv2d(512, 4096, 7)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(dropout)
        self.fc7 = nn.Conv2d(4096, 4096, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(dropout)
        # Convs initialised as torchvision's VGG. fc6/fc7 (120M weights) keep PyTorch's
        # default, uniform +-1/sqrt(fan_in), close to torchvision's N(0, 0.01) and a second
        # faster to build: they are meant to come from ImageNet through surgery anyway.
        for module in self.features:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                _zero_bias(module)

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        out: dict[int, Tensor] = {}
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _VGG16_TAPS:
                out[_VGG16_TAPS[index]] = x
        x = self.drop6(self.relu6(self.fc6(x)))
        out[32] = self.drop7(self.relu7(self.fc7(x)))
        return out


class _ResNetBackbone(_Backbone):
    """A torchvision ResNet without avgpool/fc: layer2, layer3, layer4 at strides 8, 16, 32.

    Args:
        net: the torchvision ResNet to take the layers from (keeps torchvision's key names).
    """

    def __init__(self, net: ResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        width = net.fc.in_features
        self.channels = {8: width // 4, 16: width // 2, 32: width}
        self.centred = True

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        c8 = self.layer2(x)
        c16 = self.layer3(c8)
        return {8: c8, 16: c16, 32: self.layer4(c16)}


class _MobileNetV3Backbone(_Backbone):
    """torchvision MobileNetV3-Large ``features``, tapped after the last block of each stride."""

    def __init__(self) -> None:
        super().__init__()
        self.features = mobilenet_v3_large(weights=None).features
        last: dict[int, tuple[int, int]] = {}  # stride -> (index, channels) of its last block
        stride = 1
        for index, block in enumerate(self.features):
            convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
            for conv in convs:
                stride *= conv.stride[0]
            last[stride] = (index, convs[-1].out_channels)
        self._taps = {last[s][0]: s for s in (8, 16, 32)}
        self.channels = {s: last[s][1] for s in (8, 16, 32)}
        self.centred = True

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        out: dict[int, Tensor] = {}
        for index, block in enumerate(self.features):
            x = block(x)
            if index in self._taps:
                out[self._taps[index]] = x
        return out


def _resnet18() -> _Backbone:
    return _ResNetBackbone(resnet18(weights=None))


def _resnet50() -> _Backbone:
    return _ResNetBackbone(resnet50(weights=None))


# Backbones without dropout; "vgg16" is built apart since it takes ``dropout``.
_LIGHT_BACKBONES: dict[str, Callable[[], _Backbone]] = {
    "resnet18": _resnet18,
    "resnet50": _resnet50,
    "mobilenet_v3_large": _MobileNetV3Backbone,
}


def _crop(x: Tensor, offset: int, size: Sequence[int]) -> Tensor:
    return x[..., offset : offset + size[0], offset : offset + size[1]]


def _upsample(up: nn.ConvTranspose2d, x: Tensor, size: Sequence[int]) -> Tensor:
    """``up(x, output_size=size)``, without an ``output_padding`` computed from the sizes.

    ``output_padding`` only appends rows and columns at the bottom and right, so the largest
    one (stride - 1) cropped to ``size`` gives the very same values; unlike a size-dependent
    one, it leaves a graph that exports with symbolic sizes (ONNX, ``torch.export``).
    """
    stride = cast(tuple[int, int], up.stride)
    padding = cast(tuple[int, int], up.padding)
    out = F.conv_transpose2d(
        x, up.weight, up.bias, stride, padding, output_padding=(stride[0] - 1, stride[1] - 1)
    )
    return out[..., : size[0], : size[1]]


class FCNHead(nn.Module):
    """Score layers and bilinear upsampling of one FCN variant.

    Layer names follow the reference: ``score_fr`` scores the stride-32 features,
    ``score_pool4`` / ``score_pool3`` the stride-16 / stride-8 ones (whatever the backbone),
    ``upscore*`` are the ``ConvTranspose2d`` upsamplers named in ``upsample_names``.
    ``skip_scores`` and ``upsamplers`` list the same layers in the order they run.

    Args:
        head_name: "fcn32s", "fcn16s" or "fcn8s".
        channels: backbone feature channels by stride.
        num_classes: number of output classes.
        centred: the backbone's geometry (see the module docstring); False for VGG16.
        learn_upsample: one requires_grad flag per upsampler, in order.
    """

    def __init__(
        self,
        head_name: str,
        channels: Mapping[int, int],
        num_classes: int,
        *,
        centred: bool,
        learn_upsample: Sequence[bool],
    ) -> None:
        super().__init__()
        self.skips = _SKIPS[head_name]
        self.upsample_names = _UPSAMPLERS[head_name]
        self.offsets = None if centred else _VGG16_OFFSETS[head_name]
        self.score_fr = nn.Conv2d(channels[32], num_classes, 1)
        for stride in self.skips:
            setattr(self, _SKIP_NAMES[stride], nn.Conv2d(channels[stride], num_classes, 1))
        for conv in (self.score_fr, *self.skip_scores):  # the paper zero-initialises them all
            nn.init.zeros_(conv.weight)
            _zero_bias(conv)
        factors = [2] * len(self.skips) + [self.skips[-1] if self.skips else 32]
        for name, factor, learn in zip(self.upsample_names, factors, learn_upsample, strict=True):
            size, pad = (2 * factor - 1, factor - 1) if centred else (2 * factor, 0)
            up = nn.ConvTranspose2d(
                num_classes, num_classes, size, stride=factor, padding=pad, bias=False
            )
            with torch.no_grad():
                up.weight.copy_(bilinear_kernel(num_classes, size))
            up.weight.requires_grad_(learn)
            setattr(self, name, up)

    @property
    def skip_scores(self) -> list[nn.Conv2d]:
        """The skip score layers (score_pool4, then score_pool3), as ``skips`` lists them."""
        return [cast(nn.Conv2d, self.get_submodule(_SKIP_NAMES[s])) for s in self.skips]

    @property
    def upsamplers(self) -> list[nn.ConvTranspose2d]:
        """The upsampling layers in the order they run (named in ``upsample_names``)."""
        return [cast(nn.ConvTranspose2d, self.get_submodule(n)) for n in self.upsample_names]

    def forward(self, features: Mapping[int, Tensor], size: Sequence[int]) -> Tensor:
        """Scores at the input's resolution.

        Args:
            features: backbone maps by stride.
            size: (H, W) of the input image.
        """
        score = self.score_fr(features[32])
        ups = self.upsamplers
        skip_offsets = self.offsets[0] if self.offsets else (0,) * len(self.skips)
        for up, skip_score, stride, offset in zip(
            ups, self.skip_scores, self.skips, skip_offsets, strict=False
        ):
            skip = skip_score(features[stride])
            if self.offsets is None:
                score = _upsample(up, score, skip.shape[-2:]) + skip
            else:
                score = up(score)
                score = score + _crop(skip, offset, score.shape[-2:])
        final = ups[-1]
        if self.offsets is None:
            return _upsample(final, score, size)
        return _crop(final(score), self.offsets[1], size)


class FCN(nn.Module):
    """A fully convolutional network: ``backbone`` features, then ``head`` scores.

    Optimizers can tell the pretrained part (``model.backbone.parameters()``) from the new
    one (``model.head.parameters()``). Plain attributes name the model for model cards.

    Args:
        backbone: feature extractor returning maps at strides 8, 16, 32.
        head: the FCN head.
        head_name: "fcn32s", "fcn16s" or "fcn8s".
        backbone_name: one of ``BACKBONES``.
        num_classes: number of output classes.
    """

    def __init__(
        self,
        backbone: _Backbone,
        head: FCNHead,
        *,
        head_name: str,
        backbone_name: str,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.head_name = head_name
        self.backbone_name = backbone_name
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes, H, W) for images (N, 3, H, W)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
        return self.head(self.backbone(x), x.shape[-2:])


def _fcn(
    head_name: str,
    num_classes: int,
    backbone: str,
    dropout: float,
    learn_upsample: Sequence[bool] | None,
) -> FCN:
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; valid backbones: {', '.join(BACKBONES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    names = _UPSAMPLERS[head_name]
    if learn_upsample is None:  # inner 2x upsamplers learn, the final one stays bilinear
        learn_upsample = [True] * (len(names) - 1) + [False]
    elif isinstance(learn_upsample, str | bytes) or len(learn_upsample) != len(names):
        raise ValueError(
            f"learn_upsample needs one flag per upsampling layer of {head_name} "
            f"({', '.join(names)}), got {learn_upsample!r}"
        )
    elif not all(isinstance(flag, bool) for flag in learn_upsample):
        raise ValueError(f"learn_upsample flags must be bools, got {learn_upsample!r}")
    body = _VGG16Backbone(float(dropout)) if backbone == "vgg16" else _LIGHT_BACKBONES[backbone]()
    head = FCNHead(
        head_name, body.channels, num_classes, centred=body.centred, learn_upsample=learn_upsample
    )
    return FCN(body, head, head_name=head_name, backbone_name=backbone, num_classes=num_classes)


def fcn32s(
    num_classes: int,
    backbone: str = "vgg16",
    *,
    dropout: float = 0.5,
    learn_upsample: Sequence[bool] | None = None,
) -> FCN:
    """FCN-32s: stride-32 scores upsampled 32x in one step.

    Args:
        num_classes: number of output classes.
        backbone: one of ``BACKBONES``.
        dropout: p of the dropout after fc6 and fc7 (VGG16 only; 0 disables it).
        learn_upsample: one flag for ``upscore``; default fixed (bilinear).
    """
    return _fcn("fcn32s", num_classes, backbone, dropout, learn_upsample)


def fcn16s(
    num_classes: int,
    backbone: str = "vgg16",
    *,
    dropout: float = 0.5,
    learn_upsample: Sequence[bool] | None = None,
) -> FCN:
    """FCN-16s: stride-32 scores upsampled 2x, fused with stride-16 scores, upsampled 16x.

    Args:
        num_classes: number of output classes.
        backbone: one of ``BACKBONES``.
        dropout: p of the dropout after fc6 and fc7 (VGG16 only; 0 disables it).
        learn_upsample: flags for (``upscore2``, ``upscore16``); default (True, False).
    """
    return _fcn("fcn16s", num_classes, backbone, dropout, learn_upsample)


def fcn8s(
    num_classes: int,
    backbone: str = "vgg16",
    *,
    dropout: float = 0.5,
    learn_upsample: Sequence[bool] | None = None,
) -> FCN:
    """FCN-8s: as FCN-16s, then 2x again, fused with stride-8 scores, upsampled 8x.

    Args:
        num_classes: number of output classes.
        backbone: one of ``BACKBONES``.
        dropout: p of the dropout after fc6 and fc7 (VGG16 only; 0 disables it).
        learn_upsample: flags for (``upscore2``, ``upscore_pool4``, ``upscore8``);
            default (True, True, False).
    """
    return _fcn("fcn8s", num_classes, backbone, dropout, learn_upsample)


MODELS: dict[str, Callable[..., FCN]] = {"fcn32s": fcn32s, "fcn16s": fcn16s, "fcn8s": fcn8s}
assert tuple(MODELS) == HEADS and set(BACKBONES) == {"vgg16", *_LIGHT_BACKBONES}


def build_model(name: str, num_classes: int, **options: Any) -> FCN:
    """Build a model by name: ``"fcn8s_resnet18"``, or ``"fcn8s"`` with ``backbone=...``.

    Args:
        name: ``HEAD`` or ``HEAD_BACKBONE`` with HEAD in ``HEADS`` and BACKBONE in ``BACKBONES``.
        num_classes: number of output classes.
        **options: keyword options of the builder (``backbone``, ``dropout``,
            ``learn_upsample``).
    """
    head, sep, backbone = name.partition("_")
    if head not in MODELS or (sep and backbone not in BACKBONES):
        raise ValueError(
            f"unknown model {name!r}: use HEAD or HEAD_BACKBONE (e.g. 'fcn8s_resnet18') with "
            f"HEAD in {', '.join(HEADS)} and BACKBONE in {', '.join(BACKBONES)}"
        )
    if sep:
        if options.get("backbone", backbone) != backbone:
            raise ValueError(f"model {name!r} contradicts backbone={options['backbone']!r}")
        options["backbone"] = backbone
    return MODELS[head](num_classes, **options)


def load_backbone_weights(
    model: FCN, source: str | os.PathLike[str] | BinaryIO | Mapping[str, Tensor]
) -> LoadReport:
    """Load a torchvision-format state dict (e.g. ``resnet18().state_dict()``) into the backbone.

    VGG16's fc6/fc7 go through ``transplant_vgg16_classifier``; keys with no place in the
    backbone (the ImageNet ``fc.*`` / ``classifier.*``) are ignored and reported. Shapes are
    all checked before anything is copied.

    Args:
        model: an FCN built by this module.
        source: a local path, a binary file object, or an already loaded state dict.

    Returns:
        A ``LoadReport`` of loaded, missing and ignored keys.

    Raises:
        ValueError: on a shape mismatch (naming the key), a source that is not a state dict,
            or one that shares no key with the backbone.
    """
    if isinstance(source, Mapping):
        state: Any = source
    else:
        state = torch.load(source, weights_only=True, map_location="cpu")
    if not isinstance(state, Mapping):
        raise ValueError(
            f"expected a state dict (a mapping of tensors), got {type(state).__name__}"
        )
    if model.backbone_name == "vgg16":
        report = transplant_vgg16_classifier(model, state)
    else:
        report = copy_matching(
            model.backbone.state_dict(), state, where=f"the {model.backbone_name} backbone's"
        )
    if not report.loaded:
        raise ValueError(
            f"no key of the source fits the {model.backbone_name} backbone (source keys start "
            f"{list(state)[:3]}); expected a torchvision {model.backbone_name} state dict"
        )
    return report
