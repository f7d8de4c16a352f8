"""Tiles (``fcn.tiling``, ``pipeline.segment.tiles``): windows, blend weights, stitching."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from fcn.tiling import axis_windows, check_tiling, ramp
from pipeline.segment.tiles import Tiling, assemble, segment_strip
from pipeline.storage import list_files, resolve

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("length", [50, 128, 129, 150, 200, 229, 230, 1000, 5003])
@pytest.mark.parametrize(("tile", "overlap"), [(128, 32), (128, 64), (96, 0)])
def test_windows_cover_the_axis_and_their_ramps_sum_to_one(
    length: int, tile: int, overlap: int
) -> None:
    windows = axis_windows(length, tile, overlap)
    assert windows[0].start == 0 and windows[-1].stop == length
    coverage = np.zeros(length, np.int32)
    weights = np.zeros(length, np.float64)
    for window in windows:
        coverage[window.start : window.stop] += 1
        weights[window.start : window.stop] += ramp(window)
        assert window.length <= tile * 3 // 2  # a sliver is merged, never longer than that
    assert coverage.min() >= 1 and coverage.max() <= 2  # at most two windows per pixel
    np.testing.assert_allclose(weights, 1.0, atol=1e-6)  # the blend needs no normalising
    for left, right in itertools.pairwise(windows):
        assert left.stop - right.start == overlap == left.trail == right.lead


def test_bad_tilings_are_refused() -> None:
    for tile, overlap in ((16, 0), (128, 65), (128, -1)):
        with pytest.raises(ValueError):
            check_tiling(tile, overlap)


def _scores(image: np.ndarray) -> np.ndarray:
    """Scores that depend on each pixel alone (no context): blended tiles must give exactly
    the whole image's, up to the float16 of the shared bands."""
    weights = np.array([[1.0, -0.5, 0.2], [-0.3, 1.1, 0.1], [0.2, 0.3, -0.9]], np.float32)
    pixels = image.astype(np.float32) / 255.0  # (1, 3, H, W)
    return np.einsum("cd,ndhw->nchw", weights, pixels) + np.array([0.1, 0.0, 0.2])[:, None, None]


@pytest.mark.parametrize(("inline", "size"), [(True, (300, 410)), (False, (300, 410))])
def test_strips_and_assembly_stitch_the_whole_images_labels(
    tmp_path: Path, inline: bool, size: tuple[int, int]
) -> None:
    height, width = size
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), np.uint8)
    mask = rng.integers(0, 3, (height, width), np.uint8)
    whole = _scores(image.transpose(2, 0, 1)[None])[0].argmax(0).astype(np.uint8)
    tiling = Tiling(tile=96, overlap=24)
    out_dir = resolve(str(tmp_path / "maps"))
    strip_counts = []
    for index, strip in enumerate(tiling.rows(height)):
        strip_counts.append(
            segment_strip(
                _scores,
                image_id="img",
                pixels=image[strip.start : strip.stop],
                mask=mask[strip.start : strip.stop],
                height=height,
                width=width,
                strip=index,
                tiling=tiling,
                num_classes=3,
                parts=out_dir.join("_parts"),
            )
        )
    made = assemble(
        image_id="img",
        height=height,
        width=width,
        tiling=tiling,
        num_classes=3,
        out_dir=out_dir,
        palette=False,
        inline_max_pixels=10**9 if inline else 1000,
    )
    if inline:
        assert made["label_map_uri"] is None
        labels = np.asarray(Image.open(io.BytesIO(made["label_map"])))
    else:
        import tifffile

        assert made["label_map_uri"] == out_dir.join("img.tif").uri
        labels = tifffile.imread(made["label_map_uri"])
        preview = np.asarray(Image.open(io.BytesIO(made["label_map"])))
        np.testing.assert_array_equal(preview, labels)  # under 1024 px a side: the map itself
    assert labels.shape == (height, width)
    assert (labels == whole).mean() > 0.999
    # The counts of the strips' own rows and of the shared bands add up to the map's.
    total = made["counts"]["class_pixel_counts"]
    for counts in strip_counts:
        total = np.add(total, counts["class_pixel_counts"])
    assert total.tolist() == np.bincount(labels.ravel(), minlength=3).tolist()
    inter = np.add(made["counts"]["intersection"], sum(c["intersection"] for c in strip_counts))
    want = [int(((labels == k) & (mask == k)).sum()) for k in range(3)]
    assert inter.tolist() == want
    assert not list_files(out_dir.join("_parts"))  # the parts are gone


def _cut(tmp_path: Path, names: list[str], **config: int) -> list[dict[str, object]]:
    """The rows :func:`cut_rows` makes of the named objects under ``tmp_path``."""
    from pipeline.data.layouts import MANIFEST_SCHEMA
    from pipeline.data.reading import DatasetConfig
    from pipeline.segment.tiles import cut_rows

    manifest = pa.Table.from_pylist(
        [
            {"image_id": name.split(".")[0], "image_uri": str(tmp_path / name), "bytes": 1}
            for name in names
        ],
        schema=MANIFEST_SCHEMA,
    )
    tables = cut_rows(
        manifest,
        config=DatasetConfig(**config),
        tiling=Tiling(tile=64, overlap=16),
        num_classes=3,
    )
    return [row for table in tables for row in table.to_pylist()]


def test_bad_large_images_become_error_rows_naming_object_and_reason(tmp_path: Path) -> None:
    import tifffile

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (200, 300, 3), np.uint8)
    tifffile.imwrite(tmp_path / "good.tif", pixels, tile=(64, 64), compression="zlib")
    data = (tmp_path / "good.tif").read_bytes()
    # Truncated: the header and the first tiles survive, the rest of the object is gone.
    (tmp_path / "truncated.tif").write_bytes(data[: len(data) // 2])
    # A header that claims a million pixels a side (an ~3 TB image): refused before any read.
    with tifffile.TiffFile(tmp_path / "good.tif") as tiff:
        tags = tiff.pages.first.tags
        offsets = [
            (tags[name].valueoffset, tags[name].dtype) for name in ("ImageWidth", "ImageLength")
        ]
    patched = bytearray(data)
    for offset, dtype in offsets:
        assert dtype == 4, "tifffile writes LONG sizes"  # so a million fits
        patched[offset : offset + 4] = (1_000_000).to_bytes(4, "little")
    (tmp_path / "absurd.tif").write_bytes(bytes(patched))
    Image.fromarray(pixels).save(tmp_path / "large.png")  # not tiled: decoded whole

    rows = _cut(
        tmp_path,
        ["good.tif", "truncated.tif", "absurd.tif", "large.png", "gone.png"],
        max_scene_pixels=50_000,
    )
    errors = {row["image_id"]: row for row in rows if row["error_type"] is not None}
    strips = [row for row in rows if row["image_id"] == "good"]
    assert [row["strip"] for row in strips] == list(
        range(len(Tiling(tile=64, overlap=16).rows(200)))
    )
    assert all(row["error_type"] is None and row["width"] == 300 for row in strips)
    assert sorted(errors) == ["absurd", "gone", "large", "truncated"]
    for name, error_type, words in (
        ("truncated", "Truncated", "beyond the object's"),
        ("absurd", "TooManyPixels", "1000000x1000000"),
        ("large", "TooManyPixels", "50000"),
        ("gone", None, "gone.png"),
    ):
        row = errors[name]
        assert str(tmp_path / name.split(".")[0]) in row["error_message"], row
        assert words in row["error_message"], row
        if error_type is not None:
            assert row["error_type"] == error_type, row
    # The truncated TIFF's good strips may come first; its error row is what counts.
    assert len([row for row in rows if row["image_id"] == "absurd"]) == 1
