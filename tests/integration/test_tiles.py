"""Tiled segmentation (``--tile``) on a real local Ray and real storage (local files, S3).

What a user relies on:

- seams do not show: on images small enough to segment whole, the tiled label maps agree
  with the whole-image ones on >= 99 % of pixels and the mean IoU within 0.01, and
  ``class_metrics`` still add up to the run's ``class_iou``;
- a scene on S3 is read by ranged requests (a one-tile region costs a small part of the
  object), a label map too large for its cell is a tiled TIFF object that its row points
  at, and a run killed mid-image, rerun under the same id, has one row per image and no
  half-written label map or staging part left.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcn.synthetic import CLASS_NAMES
from infra.local.seaweedfs import SeaweedS3
from pipeline.artifacts import ModelCard, save_model
from pipeline.config import make
from pipeline.data.scenes import WindowReader
from pipeline.data.synthetic import write_scenes, write_synthetic
from pipeline.segment.config import SegmentConfig
from pipeline.segment.driver import segment
from pipeline.storage import join, list_files, read_bytes, resolve
from pipeline.store.read import committed_runs, read_table
from tests.cli import FCNPIPE
from tests.models import trained_fcn

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small FCN-8s trained a little (tests.models), as an artifact on local disk: at 96 px,
    where the 64 px model of the unit tests is too unsure of itself (near-ties flip between
    any two ways of computing the scores, and its class IoUs swing by more than 0.01)."""
    uri = str(tmp_path_factory.mktemp("tiles") / "model")
    card = ModelCard(
        run_id="m",
        architecture="fcn8s",
        backbone="resnet18",
        num_classes=len(CLASS_NAMES),
        class_names=list(CLASS_NAMES),
        normalization={"name": "imagenet"},
    )
    save_model(trained_fcn(size=96), card, uri)
    return uri


def _labels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def _class_iou_from_metrics(out: str, run_id: str) -> list[float | None]:
    rows = read_table(out, "class_metrics", [run_id]).to_pylist()
    inter, union = np.zeros(len(CLASS_NAMES)), np.zeros(len(CLASS_NAMES))
    for row in rows:
        inter[row["class_id"]] += row["intersection"]
        union[row["class_id"]] += row["union"]
    return [float(i / u) if u else None for i, u in zip(inter, union, strict=True)]


def test_tiled_label_maps_agree_with_whole_images(
    model_uri: str, tmp_path: Path, ray_local: None
) -> None:
    data = str(tmp_path / "data")
    write_synthetic(data, num_images=4, size=(256, 320), seed=7, val_fraction=0.0)
    out = str(tmp_path / "out")
    common = {"input_uri": data, "model_uri": model_uri, "output_uri": out}
    reference = {"backend": "torch", "precision": "fp32", "memory_format": "contiguous"}
    whole = segment(make(SegmentConfig, run_id="whole", **common, **reference))
    tiled = segment(
        make(SegmentConfig, run_id="tiled", tile=192, overlap=64, **common, **reference)
    )
    assert (tiled.num_images, tiled.num_errors) == (whole.num_images, whole.num_errors) == (4, 0)
    maps: dict[str, dict[str, np.ndarray]] = {}
    for row in read_table(out, "predictions").to_pylist():
        assert row["label_map_uri"] is None  # small maps stay in their cells
        maps.setdefault(row["image_id"], {})[row["run_id"]] = _labels(row["label_map"])
    agree = np.mean([(m["whole"] == m["tiled"]).mean() for m in maps.values()])
    print(f"tiled vs whole: {agree:.4f} of pixels agree; mean IoU {whole.scores} vs {tiled.scores}")
    assert whole.scores is not None and tiled.scores is not None
    assert agree >= 0.99
    assert abs(whole.scores["mean_iou"] - tiled.scores["mean_iou"]) <= 0.01
    stored = read_table(out, "runs", ["tiled"])["class_iou"][0].as_py()
    assert _class_iou_from_metrics(out, "tiled") == pytest.approx(stored)
    assert not list_files(join(out, "label_maps", "run_id=tiled", "_parts"))


def test_scene_on_s3_read_by_range_killed_mid_image_then_completed(
    model_uri: str, s3_env: SeaweedS3, bucket: str, ray_local: None
) -> None:
    root = f"s3://{bucket}"
    data, out = join(root, "scenes"), join(root, "out")
    write_scenes(data, num_scenes=1, size=(1200, 1500), seed=3)
    scene, mask_uri = join(data, "images/scene_000.tif"), join(data, "masks/scene_000.tif")

    with WindowReader(resolve(scene), stage="decode_image", channels=3, max_pixels=10**8) as r:
        region = r.read(256, 512, 512, 768)  # one of the TIFF's 5 x 6 tiles
        fetched, size = r.fetched, r.file.size
        r_image = r.read(0, r.height, 0, r.width)
    print(f"a one-tile region fetched {fetched} of the scene's {size} bytes")
    assert region.shape == (256, 256, 3) and fetched < size / 10

    args = [
        FCNPIPE, "segment", data, "--model", model_uri, "--output", out, "--run-id", "big",
        "--tile", "512", "--overlap", "64", "--inline-max-pixels", "1000000",
        "--backend", "torch", "--num-cpus", "2",
    ]  # fmt: skip
    # The driver dies (os._exit, as a kill would) once one strip of the scene is back.
    first = subprocess.run([*args, "--fail-after-strips", "1"], capture_output=True, text=True)
    assert first.returncode == 1 and "fault injection" in first.stdout, first.stderr[-3000:]
    assert committed_runs(out) == []
    assert list_files(join(out, "label_maps", "run_id=big", "_parts"))  # the crash's parts

    result = segment(
        make(
            SegmentConfig,
            input_uri=data,
            model_uri=model_uri,
            output_uri=out,
            run_id="big",
            tile=512,
            overlap=64,
            inline_max_pixels=1_000_000,
            backend="torch",
        )
    )
    assert (result.num_images, result.num_errors, result.skipped) == (1, 0, 0)
    (row,) = read_table(out, "predictions", ["big"]).to_pylist()
    assert row["label_map_uri"] == join(out, "label_maps", "run_id=big", "scene_000.tif")
    import tifffile

    labels = tifffile.imread(io.BytesIO(read_bytes(row["label_map_uri"])))
    assert labels.shape == (row["height"], row["width"]) == (1200, 1500)
    assert row["class_pixel_counts"] == np.bincount(labels.ravel(), minlength=6).tolist()
    preview = _labels(row["label_map"])
    assert max(preview.shape) <= 1024 and preview.shape == labels[::2, ::2].shape
    mask = tifffile.imread(io.BytesIO(read_bytes(mask_uri)))
    valid = mask != 255
    print(f"scene pixel accuracy {(labels[valid] == mask[valid]).mean():.3f}")
    stored = read_table(out, "runs", ["big"])["class_iou"][0].as_py()
    assert _class_iou_from_metrics(out, "big") == pytest.approx(stored)
    assert not list_files(join(out, "label_maps", "run_id=big", "_parts"))  # parts are gone
    assert committed_runs(out) == ["big"]

    # `fcnpipe show`'s overlay of the scene: sampled as the preview is, never whole.
    from pipeline.results.html import overlay_panel
    from pipeline.results.reader import Results

    with Results(out) as results:
        panel = overlay_panel(results, "big", "scene_000")
    assert panel.has_ground_truth and panel.pixels.shape == (600, 3 * 750, 3)
    np.testing.assert_array_equal(panel.pixels[:, :750], r_image[::2, ::2])


def test_bench_tiles_prints_rates_and_memory_per_scene_size(
    tmp_path: Path, ray_local: None
) -> None:
    from pipeline.bench.tiles import bench_tiles, format_bench_tiles

    result = bench_tiles(
        root=str(tmp_path),
        scene_sizes=(400, 600),
        tile=256,
        overlap=32,
        small_images=2,
        model="fcn32s_resnet18",
        actors=1,
        backend="torch",
    )
    text = format_bench_tiles(result)
    print(text)
    assert [scene["side"] for scene in result["scenes"]] == [400, 600]
    for scene in result["scenes"]:
        assert scene["mp_per_s"] > 0 and scene["driver_mb"] > 0 and scene["actor_mb"] > 0
    assert "scene/small" in text and "peak RSS at 0 MP over 0 MP" in text
