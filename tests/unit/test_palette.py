"""VOC palette, label-map PNG round trips, colourising and overlays."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fcn.palette import (
    VOC_CLASSES,
    colorize,
    decode_label_png,
    encode_label_png,
    overlay,
    voc_palette,
)

pytestmark = pytest.mark.unit


def random_label_map(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """VOC-like ids: 0..20 and 255."""
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([*range(21), 255], dtype=np.uint8), size=shape)


def test_voc_classes() -> None:
    assert len(VOC_CLASSES) == 21
    assert VOC_CLASSES[0] == "background"
    assert VOC_CLASSES[15] == "person"
    assert VOC_CLASSES[-1] == "tvmonitor"


def test_voc_palette_known_colours() -> None:
    p = voc_palette()
    assert p.shape == (256, 3)
    assert p.dtype == np.uint8
    assert p[0].tolist() == [0, 0, 0]
    assert p[1].tolist() == [128, 0, 0]  # aeroplane
    assert p[2].tolist() == [0, 128, 0]  # bicycle
    assert p[15].tolist() == [192, 128, 128]  # person
    assert p[20].tolist() == [0, 64, 128]  # tvmonitor
    assert p[255].tolist() == [224, 224, 192]  # ignore / void boundary
    np.testing.assert_array_equal(voc_palette(21), p[:21])
    assert len({tuple(c) for c in p}) == 256  # every id has its own colour


@pytest.mark.parametrize("shape", [(1, 1), (7, 9), (40, 33)])
@pytest.mark.parametrize("palette", [False, True])
def test_round_trip(shape: tuple[int, int], palette: bool) -> None:
    labels = random_label_map(shape)
    data = encode_label_png(labels, palette=palette)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        assert img.mode == ("P" if palette else "L")
        assert img.size == (shape[1], shape[0])
        if palette:
            colours = img.getpalette()
            assert colours is not None
            assert colours[: 3 * 256] == voc_palette().reshape(-1).tolist()
    decoded = decode_label_png(data)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, labels)


def test_encode_accepts_torch_and_wide_integer_dtypes() -> None:
    labels = random_label_map((5, 6), seed=1)
    as_int64 = torch.from_numpy(labels.astype(np.int64))
    np.testing.assert_array_equal(decode_label_png(encode_label_png(as_int64)), labels)


def test_encode_rejects_bad_maps() -> None:
    with pytest.raises(ValueError, match="2-D"):
        encode_label_png(np.zeros((2, 3, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 255\].*256"):
        encode_label_png(np.array([[0, 256]]))
    with pytest.raises(ValueError, match=r"\[-1, 3\]"):
        encode_label_png(np.array([[-1, 3]]))
    with pytest.raises(ValueError, match="integer"):
        encode_label_png(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="empty"):
        encode_label_png(np.zeros((0, 4), dtype=np.uint8))


def test_decode_voc_style_png_written_by_pil() -> None:
    # As VOC SegmentationClass files: mode P, VOC palette, indices = class ids.
    labels = random_label_map((11, 13), seed=2)
    img = Image.fromarray(labels).convert("L")
    img.putpalette(voc_palette().reshape(-1).tolist())
    assert img.mode == "P"
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    np.testing.assert_array_equal(decode_label_png(buf.getvalue()), labels)


def test_decode_rejects_rgb_and_non_png() -> None:
    rgb = Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8))
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    with pytest.raises(ValueError, match=r"indexed .* or 8-bit grayscale .* got mode RGB"):
        decode_label_png(buf.getvalue())
    buf = io.BytesIO()
    rgb.save(buf, format="BMP")
    with pytest.raises(ValueError, match="PNG"):
        decode_label_png(buf.getvalue())
    with pytest.raises(ValueError, match="cannot decode"):
        decode_label_png(b"not an image")


def test_colorize() -> None:
    labels = random_label_map((3, 4), seed=3)
    colours = colorize(labels)
    assert colours.shape == (3, 4, 3)
    assert colours.dtype == np.uint8
    np.testing.assert_array_equal(colours, voc_palette()[labels])
    custom = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)
    np.testing.assert_array_equal(colorize(np.array([[1, 0]]), custom), [[[4, 5, 6], [1, 2, 3]]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        colorize(np.array([[2]]), custom)


def test_overlay() -> None:
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    labels = random_label_map((7, 9), seed=4)
    labels[0, 0], labels[0, 1], labels[0, 2] = 0, 255, 15

    out = overlay(image, labels)
    assert out.shape == (7, 9, 3)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], image[0, 0])  # background stays the image
    np.testing.assert_array_equal(out[0, 1], image[0, 1])  # ignore stays the image
    person = np.array([192, 128, 128])
    np.testing.assert_array_equal(out[0, 2], np.rint((image[0, 2] + person) / 2))

    np.testing.assert_array_equal(overlay(image, labels, alpha=0.0), image)
    full = overlay(image, labels, alpha=1.0)
    objects = (labels != 0) & (labels != 255)
    np.testing.assert_array_equal(full[objects], voc_palette()[labels[objects]])

    with pytest.raises(ValueError, match=r"\(9, 7\).*\(7, 9\)"):
        overlay(image, labels.T)
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, labels, alpha=1.5)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        overlay(image[..., 0], labels)
