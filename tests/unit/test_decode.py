"""The bounded decoder (pipeline.data.decode) and the row-level reading of pipeline.data.

Everything here runs without Ray or a server: bytes built in memory, files in tmp_path.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from fcn.palette import encode_label_png
from pipeline.data.batches import samples_from_batch
from pipeline.data.decode import (
    DEFAULT_MAX_PIXELS,
    DecodeError,
    check_formats,
    check_max_pixels,
    decode_image,
    decode_mask,
)
from pipeline.data.layouts import MANIFEST_SCHEMA
from pipeline.data.reading import DECODED_SCHEMA, DatasetConfig, load_batch
from pipeline.segment.actor import group_by_size
from tests.images import encode, png_claiming

pytestmark = pytest.mark.unit

RGB = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)


def _fails(stage: str, error_type: str, fn: Any, *args: Any, **kwargs: Any) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        fn(*args, **kwargs)
    assert (info.value.stage, info.value.error_type) == (stage, error_type), info.value
    return info.value


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True}), ("PPM", {})],
)
def test_lossless_formats_round_trip(fmt: str, kwargs: dict[str, Any]) -> None:
    data = encode(Image.fromarray(RGB), fmt, **kwargs)
    formats = ("PNG", "BMP", "TIFF", "WEBP", "PPM")
    out = decode_image(data, formats=formats)
    assert out.dtype == np.uint8 and out.flags.writeable
    np.testing.assert_array_equal(out, RGB)


def test_jpeg_and_gif_decode_to_rgb() -> None:
    data = encode(Image.fromarray(RGB), "JPEG", quality=95)
    np.testing.assert_array_equal(decode_image(data), np.asarray(Image.open(io.BytesIO(data))))
    gif = decode_image(encode(Image.fromarray(RGB).convert("P"), "GIF"))
    assert gif.shape == (12, 10, 3)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "CMYK"])
def test_modes_convert_to_rgb(mode: str) -> None:
    img = Image.fromarray(RGB).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = decode_image(encode(img, fmt))
    assert out.shape == (12, 10, 3) and out.dtype == np.uint8
    if mode == "RGBA":
        np.testing.assert_array_equal(out, RGB)  # alpha dropped, colours kept
    if mode in ("L", "LA"):
        gray = np.asarray(Image.fromarray(RGB).convert("L"))
        np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))


def test_palette_with_transparency() -> None:
    img = Image.fromarray(RGB).convert("P")
    img.info["transparency"] = 0
    out = decode_image(encode(img, "PNG", transparency=0))
    assert out.shape == (12, 10, 3)


def test_16_bit_grayscale_is_scaled_not_clipped() -> None:
    values = np.array([[0, 255, 256, 65535]], dtype=np.uint16)
    out = decode_image(encode(Image.fromarray(values), "PNG"))
    assert out[..., 0].tolist() == [[0, 0, 1, 255]]


def test_header_claiming_100000_squared_is_refused_before_decoding() -> None:
    error = _fails("decode_image", "TooManyPixels", decode_image, png_claiming(100_000, 100_000))
    assert error.message == (
        "image header claims 100000x100000 = 10000000000 pixels > max_pixels 50000000"
    )


def test_size_between_pillow_limits_is_refused_quietly() -> None:
    # 8000 x 8000 = 64 MP: under Pillow's error limit, over our default budget.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        error = _fails("decode_image", "TooManyPixels", decode_image, png_claiming(8000, 8000))
    assert "8000x8000 = 64000000 pixels" in error.message


def test_max_pixels_is_checked_on_the_header() -> None:
    _fails(
        "decode_image", "TooManyPixels", decode_image, png_claiming(2000, 2000), max_pixels=10**6
    )
    assert decode_image(encode(Image.fromarray(RGB), "PNG"), max_pixels=120).shape == (12, 10, 3)
    _fails(
        "decode_image",
        "TooManyPixels",
        decode_image,
        encode(Image.fromarray(RGB), "PNG"),
        max_pixels=119,
    )


def test_truncated_and_corrupt_images() -> None:
    big = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpeg = encode(Image.fromarray(big), "JPEG", quality=95)
    png = encode(Image.fromarray(big), "PNG")
    _fails("decode_image", "Truncated", decode_image, jpeg[: len(jpeg) // 2])
    _fails("decode_image", "Truncated", decode_image, jpeg[:100])
    _fails("decode_image", "Truncated", decode_image, png[: len(png) // 2])
    corrupt = bytearray(png)
    corrupt[len(png) // 2 : len(png) // 2 + 64] = b"\xff" * 64
    _fails("decode_image", "CorruptData", decode_image, bytes(corrupt))


def test_not_images() -> None:
    _fails("decode_image", "EmptyObject", decode_image, b"")
    error = _fails("decode_image", "UnsupportedFormat", decode_image, b"hello, not a picture")
    assert "b'hello, n'" in error.message
    ico = encode(Image.fromarray(RGB), "ICO")
    _fails("decode_image", "UnsupportedFormat", decode_image, ico)
    jpeg = encode(Image.fromarray(RGB), "JPEG")
    _fails("decode_image", "UnsupportedFormat", decode_image, jpeg, formats=("PNG",))


def test_decode_error_pickles() -> None:
    error = DecodeError("decode_mask", "SizeMismatch", "mask is 2x2")
    again = pickle.loads(pickle.dumps(error))
    assert (again.stage, again.error_type, again.message) == (
        "decode_mask",
        "SizeMismatch",
        "mask is 2x2",
    )
    assert str(again) == "decode_mask: SizeMismatch: mask is 2x2"


def test_limits_are_validated() -> None:
    assert check_max_pixels(DEFAULT_MAX_PIXELS) == DEFAULT_MAX_PIXELS
    for bad in (0, 10**12):
        with pytest.raises(ValueError, match="max_pixels"):
            check_max_pixels(bad)
    assert check_formats(["png", "jpeg"]) == ("PNG", "JPEG")
    with pytest.raises(ValueError, match="NOPE"):
        check_formats(["PNG", "nope"])
    with pytest.raises(ValueError):
        check_formats([])


# ----------------------------------------------------------------------------- masks


def test_masks_palette_and_grayscale() -> None:
    labels = np.random.default_rng(2).integers(0, 21, (12, 10), dtype=np.uint8)
    labels[0, :3] = 255
    for palette in (True, False):
        out = decode_mask(
            encode_label_png(labels, palette=palette), height=12, width=10, num_classes=21
        )
        np.testing.assert_array_equal(out, labels)


def test_mask_checks() -> None:
    labels = np.zeros((12, 10), dtype=np.uint8)
    error = _fails(
        "decode_mask",
        "SizeMismatch",
        decode_mask,
        encode_label_png(labels[:6]),
        height=12,
        width=10,
        num_classes=2,
    )
    assert error.message == "mask is 10x6 pixels but its image is 10x12"
    labels[0, 0], labels[1, 1], labels[2, 2] = 3, 30, 255
    error = _fails(
        "decode_mask",
        "LabelOutOfRange",
        decode_mask,
        encode_label_png(labels),
        height=12,
        width=10,
        num_classes=3,
    )
    assert "2 pixels" in error.message and "3, 30" in error.message
    decode_mask(encode_label_png(labels), height=12, width=10, num_classes=None)
    rgb_png = encode(Image.fromarray(RGB), "PNG")
    _fails(
        "decode_mask", "UnsupportedMode", decode_mask, rgb_png, height=12, width=10, num_classes=3
    )
    jpeg = encode(Image.fromarray(labels), "JPEG")
    _fails(
        "decode_mask", "UnsupportedFormat", decode_mask, jpeg, height=12, width=10, num_classes=3
    )
    _fails("decode_mask", "EmptyObject", decode_mask, b"", height=12, width=10, num_classes=3)


# ----------------------------------------------------------------------------- rows


def _manifest(rows: list[dict[str, Any]]) -> pa.Table:
    defaults = {"mask_uri": None, "split": None, "bytes": None}
    return pa.Table.from_pylist([{**defaults, **r} for r in rows], schema=MANIFEST_SCHEMA)


def test_load_batch_gives_one_row_per_input(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(encode(Image.fromarray(RGB), "PNG"))
    mask = tmp_path / "good_mask.png"
    mask.write_bytes(encode_label_png(np.ones((12, 10), np.uint8)))
    (tmp_path / "big.png").write_bytes(encode(Image.fromarray(RGB), "PNG"))
    batch = _manifest(
        [
            {"image_id": "good", "image_uri": str(good), "mask_uri": str(mask)},
            {"image_id": "missing", "image_uri": str(tmp_path / "missing.png")},
            {"image_id": "escape", "image_uri": f"{tmp_path}/sub/../good.png"},
            {"image_id": "big", "image_uri": str(tmp_path / "big.png"), "bytes": 10**9},
            {"image_id": "no_mask", "image_uri": f"file://{good}"},
            {"image_id": "dir", "image_uri": str(tmp_path)},
        ]
    )
    out = load_batch(batch, config=DatasetConfig(), num_classes=2, require_masks=True)
    assert out.schema == DECODED_SCHEMA
    rows = out.to_pylist()
    assert [r["image_id"] for r in rows] == ["good", "missing", "escape", "big", "no_mask", "dir"]
    errors = {r["image_id"]: (r["error_stage"], r["error_type"]) for r in rows[1:]}
    assert errors == {
        "missing": ("read", "NotFound"),
        "escape": ("read", "UnsafeKey"),
        "big": ("read", "TooLarge"),
        "no_mask": ("read", "MissingMask"),
        "dir": ("read", "IsADirectoryError"),
    }
    assert all(r["image"] is None and r["height"] is None for r in rows[1:])
    (sample,) = samples_from_batch(out)
    np.testing.assert_array_equal(sample.image, RGB)
    np.testing.assert_array_equal(sample.mask, np.ones((12, 10), np.uint8))


def test_group_by_size_keeps_sizes_apart() -> None:
    def row(i: int, h: int, w: int) -> dict[str, Any]:
        return {
            "image_id": f"i{i}",
            "image_uri": f"/x/{i}.png",
            "mask_uri": None,
            "split": None,
            "height": h,
            "width": w,
            "image": bytes(h * w * 3),
            "mask": None,
            "error_stage": None,
        }

    samples = samples_from_batch(
        {
            k: [row(i, *hw)[k] for i, hw in enumerate([(2, 3), (4, 4), (2, 3), (2, 3)])]
            for k in row(0, 1, 1)
        }
    )
    # A budget of two 2x3 images; the 4x4 one is over it and runs alone.
    groups = group_by_size(samples, max_pixels=12)
    assert [[s.image_id for s in g] for g in groups] == [["i0", "i2"], ["i3"], ["i1"]]
    alone = group_by_size(samples, max_pixels=1)
    assert [[s.image_id for s in g] for g in alone] == [["i0"], ["i2"], ["i3"], ["i1"]]
    together = group_by_size(samples, max_pixels=10**6)
    assert [[s.image_id for s in g] for g in together] == [["i0", "i2", "i3"], ["i1"]]


def test_dataset_config_is_validated() -> None:
    assert DatasetConfig(formats=("png",)).formats == ("PNG",)
    for kwargs in (
        {"layout": "coco"},
        {"formats": ("PNG", "XYZ")},
        {"max_pixels": 10**12},
        {"decode_batch_size": 0},
        {"decode_cpus": 0},
        {"read_threads": 0},
    ):
        with pytest.raises(ValueError):
            DatasetConfig(**kwargs)


def test_objects_of_unknown_size_are_bounded_by_max_bytes(tmp_path: Path) -> None:
    # The manifest does not know these sizes (a hand-made manifest, a mask): the read
    # itself must stop at max_bytes rather than load the whole object first.
    image = tmp_path / "image.png"
    image.write_bytes(encode(Image.fromarray(RGB), "PNG"))
    big_mask = tmp_path / "mask.png"
    big_mask.write_bytes(encode_label_png(np.ones((12, 10), np.uint8)) + b"\0" * 4096)
    limit = image.stat().st_size  # the image fits exactly; the padded mask does not
    batch = _manifest(
        [
            {"image_id": "ok", "image_uri": str(image)},
            {"image_id": "fat_mask", "image_uri": str(image), "mask_uri": str(big_mask)},
        ]
    )
    rows = load_batch(batch, config=DatasetConfig(max_bytes=limit), num_classes=2).to_pylist()
    assert rows[0]["error_type"] is None and rows[0]["height"] == 12
    assert (rows[1]["error_stage"], rows[1]["error_type"]) == ("read", "TooLarge")
    assert str(big_mask) in rows[1]["error_message"]
