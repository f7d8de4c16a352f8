"""pipeline.data on real storage (local files and SeaweedFS S3) and a real local Ray.

Tests taking ``storage_root`` run once per backend, on the session's local Ray
(``ray_local``, 2 CPUs), whose workers see the test S3 server's credentials.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import ray
from PIL import Image

from fcn.palette import encode_label_png
from fcn.synthetic import CLASS_NAMES, make_dataset, make_sample
from infra.local.seaweedfs import SeaweedS3
from pipeline.bench.read import bench_read, format_bench
from pipeline.data.batches import samples_from_batch
from pipeline.data.layouts import (
    DatasetError,
    build_manifest,
    dataset_info,
    detect_layout,
    load_manifest,
    manifest_hash,
    manifest_meta,
    read_manifest,
    write_manifest,
)
from pipeline.data.reading import DatasetConfig, read_dataset, read_decoded
from pipeline.data.synthetic import write_synthetic
from pipeline.storage import join, read_bytes, write_bytes
from tests.images import encode, png_claiming

pytestmark = pytest.mark.integration

S3_REGION = "us-east-1"


# ----------------------------------------------------------------------------- helpers


def _jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _put(root: str, rel: str, data: bytes) -> None:
    write_bytes(join(root, rel), data)


def _decoded_rows(source: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """Every decoded row (good and error) from one pass, as dicts."""
    rows: list[dict[str, Any]] = []
    for batch in read_decoded(source, **kwargs).iter_batches(batch_format="pyarrow"):
        rows.extend(pa.table(batch).to_pylist())
    return rows


# ----------------------------------------------------------------------------- layouts


def test_synthetic_voc_round_trip(storage_root: str, ray_local: None) -> None:
    info = write_synthetic(storage_root, num_images=10, size=(40, 48), seed=3, val_fraction=0.2)
    synthetic = make_dataset(10, size=(40, 48), seed=3, val_fraction=0.2)
    assert info.splits == {"train": 8, "val": 2}

    assert detect_layout(storage_root) == "voc"
    listed = dataset_info(storage_root)
    assert (listed.layout, listed.num_images, listed.num_with_masks) == ("voc", 10, 10)
    assert listed.splits == {"train": 8, "val": 2}
    assert listed.class_names == CLASS_NAMES

    manifest = build_manifest(storage_root)
    assert manifest["image_id"].to_pylist() == synthetic.ids()
    assert manifest["split"].to_pylist() == [synthetic.split_of(i) for i in range(10)]
    assert all(uri.startswith(storage_root) for uri in manifest["image_uri"].to_pylist())

    # Written once, read back with its metadata; a job given the .parquet reads no listing.
    manifest_uri = join(storage_root, "manifests", "all.parquet")
    write_manifest(manifest, manifest_uri)
    again = read_manifest(manifest_uri)
    assert manifest_hash(again) == manifest_hash(manifest)
    assert manifest_meta(again).class_names == CLASS_NAMES
    assert load_manifest(manifest_uri, "val")["image_id"].to_pylist() == synthetic.ids("val")
    assert dataset_info(manifest_uri).splits == {"train": 8, "val": 2}

    config = DatasetConfig(rows_per_block=3, decode_batch_size=2)
    rows = _decoded_rows(manifest_uri, split="train", config=config, require_masks=True)
    assert sorted(r["image_id"] for r in rows) == synthetic.ids("train")
    assert all(r["error_stage"] is None for r in rows)
    for sample in samples_from_batch(pa.Table.from_pylist(rows)):
        index = int(sample.image_id.split("_")[1])
        image, mask = make_sample(index, size=(40, 48), seed=3)
        stored = np.asarray(Image.open(io.BytesIO(read_bytes(sample.image_uri))).convert("RGB"))
        np.testing.assert_array_equal(sample.image, stored)
        assert np.abs(sample.image.astype(int) - image).mean() < 5  # JPEG quality 95, 4:4:4
        np.testing.assert_array_equal(sample.mask, mask)


def test_generic_layout_round_trip(storage_root: str, ray_local: None) -> None:
    rng = np.random.default_rng(0)
    images = {
        "a": rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
        "b": rng.integers(0, 256, (33, 17, 3), dtype=np.uint8),
        "sub/c": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
    }
    masks = {k: rng.integers(0, 3, v.shape[:2], dtype=np.uint8) for k, v in images.items()}
    masks["a"][0, 0] = 255  # ignore is allowed
    for key, image in images.items():
        _put(storage_root, f"images/{key}.png", encode(Image.fromarray(image), "PNG"))
        _put(storage_root, f"masks/{key}.png", encode_label_png(masks[key]))
    _put(storage_root, "images/no_mask.png", encode(Image.fromarray(images["a"]), "PNG"))
    _put(storage_root, "images/notes.txt", b"not listed")
    _put(storage_root, "classes.txt", b"bg\nfg\nother\n")
    _put(storage_root, "splits/train.txt", b"a\nsub/c\n")

    assert detect_layout(storage_root) == "generic"
    manifest = build_manifest(storage_root)
    assert manifest["image_id"].to_pylist() == ["a", "b", "no_mask", "sub/c"]
    assert manifest["split"].to_pylist() == ["train", None, None, "train"]
    assert manifest["mask_uri"].is_null().to_pylist() == [False, False, True, False]
    assert manifest_meta(manifest).class_names == ("bg", "fg", "other")

    # Without require_masks an image without a mask is a good row with a null mask.
    rows = {r["image_id"]: r for r in _decoded_rows(storage_root, config=DatasetConfig())}
    assert set(rows) == {"a", "b", "no_mask", "sub/c"}
    assert all(r["error_stage"] is None for r in rows.values())
    samples = {s.image_id: s for s in samples_from_batch(pa.Table.from_pylist(list(rows.values())))}
    for key, image in images.items():
        np.testing.assert_array_equal(samples[key].image, image)
        np.testing.assert_array_equal(samples[key].mask, masks[key])
    assert samples["no_mask"].mask is None

    # Training requires masks: the image without one becomes an error row, nothing else.
    strict = _decoded_rows(storage_root, config=DatasetConfig(), require_masks=True)
    outcome = {r["image_id"]: (r["error_stage"], r["error_type"]) for r in strict}
    assert outcome == {
        "a": (None, None),
        "b": (None, None),
        "sub/c": (None, None),
        "no_mask": ("read", "MissingMask"),
    }
    assert load_manifest(storage_root, "train")["image_id"].to_pylist() == ["a", "sub/c"]


def test_images_only_layout(storage_root: str, ray_local: None) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    gray16 = Image.fromarray((np.arange(24 * 20).reshape(24, 20) * 100).astype(np.uint16))
    files = {
        "x/rgba.png": encode(base.convert("RGBA"), "PNG"),
        "x/y/gray.png": encode(base.convert("L"), "PNG"),
        "palette.gif": encode(base.convert("P"), "GIF"),
        "deep16.png": encode(gray16, "PNG"),
        "pic.bmp": encode(base, "BMP"),
        "pic.webp": encode(base, "WEBP", lossless=True),
        "scan.tiff": encode(base, "TIFF"),
        "photo.jpg": _jpeg(rgb),
        "dup.jpg": _jpeg(rgb),
        "dup.png": encode(base, "PNG"),
    }
    for rel, data in files.items():
        _put(storage_root, rel, data)
    _put(storage_root, "readme.md", b"# not an image")

    assert detect_layout(storage_root) == "images"
    manifest = build_manifest(storage_root)
    ids = manifest["image_id"].to_pylist()
    expected = ["x/rgba", "x/y/gray", "palette", "deep16", "pic.bmp", "pic.webp", "scan"]
    assert sorted(ids) == sorted([*expected, "photo", "dup.jpg", "dup.png"])
    with pytest.raises(DatasetError, match="no splits"):
        build_manifest(storage_root, split="train")

    rows = _decoded_rows(manifest, config=DatasetConfig())
    assert sorted(r["image_id"] for r in rows) == sorted(ids)
    assert [r["error_message"] for r in rows if r["error_stage"]] == []
    samples = {s.image_id: s for s in samples_from_batch(pa.Table.from_pylist(rows))}
    assert all(s.image.shape == (24, 20, 3) and s.mask is None for s in samples.values())
    np.testing.assert_array_equal(samples["pic.webp"].image, rgb)
    np.testing.assert_array_equal(samples["x/rgba"].image, rgb)
    assert samples["deep16"].image[0, 1].tolist() == [0, 0, 0]  # 100 >> 8
    assert samples["deep16"].image[1, 0].tolist() == [7, 7, 7]  # 2000 >> 8


# ----------------------------------------------------------------------------- bad inputs


def test_bad_objects_become_error_rows(storage_root: str, ray_local: None) -> None:
    write_synthetic(storage_root, num_images=6, size=32, seed=0, val_fraction=0.0)
    good_ids = [f"shapes_{i:06d}" for i in range(6)]
    image, mask = make_sample(0, size=32)
    png = encode(Image.fromarray(image), "PNG")
    corrupt = bytearray(png)
    corrupt[len(png) // 2 : len(png) // 2 + 40] = b"\xff" * 40  # inside IDAT
    wrong_ids = mask.copy()
    wrong_ids[:4, :4] = 7
    wrong_ids[-1, -1] = 200
    bad_images = {
        "corrupt.png": bytes(corrupt),
        "truncated.jpg": _jpeg(image)[:700],
        "empty.jpg": b"",
        "text.jpg": b"this is not a JPEG at all\n",
        "bomb.png": png_claiming(100_000, 100_000),
        "wrong_size.jpg": _jpeg(image),
        "wrong_ids.jpg": _jpeg(image),
        "no_mask.jpg": _jpeg(image),
    }
    for name, data in bad_images.items():
        _put(storage_root, f"JPEGImages/{name}", data)
        if name != "no_mask.jpg":
            stem = name.rsplit(".", 1)[0]
            mask_png = {
                "wrong_size": encode_label_png(mask[:16, :20]),
                "wrong_ids": encode_label_png(wrong_ids, palette=True),
            }.get(stem, encode_label_png(mask, palette=True))
            _put(storage_root, f"SegmentationClass/{stem}.png", mask_png)
    bad_ids = [name.rsplit(".", 1)[0] for name in bad_images]
    escaping = "../JPEGImages/shapes_000000"
    listed = [*good_ids[:3], *bad_ids, "ghost", escaping, *good_ids[3:]]
    _put(storage_root, "ImageSets/Segmentation/train.txt", "\n".join(listed).encode())

    config = DatasetConfig(rows_per_block=4, decode_batch_size=3)
    good, errors = read_dataset(
        storage_root, split="train", config=config, require_masks=True, cache=True
    )
    good_rows = good.take_all()
    error_list = errors.take_all()

    # Every listed id comes out exactly once, as a good row or an error row.
    assert len(good_rows) + len(error_list) == len(listed)
    assert sorted(r["image_id"] for r in good_rows) == good_ids
    assert sorted(r["image_id"] for r in error_list) == sorted([*bad_ids, "ghost", escaping])
    assert set(error_list[0]) == {"image_id", "image_uri", "stage", "error_type", "message"}
    assert "error_stage" not in good_rows[0]

    found = {r["image_id"]: (r["stage"], r["error_type"], r["message"]) for r in error_list}
    expected = {
        "corrupt": ("decode_image", "CorruptData"),
        "truncated": ("decode_image", "Truncated"),
        "empty": ("decode_image", "EmptyObject"),
        "text": ("decode_image", "UnsupportedFormat"),
        "bomb": ("decode_image", "TooManyPixels"),
        "wrong_size": ("decode_mask", "SizeMismatch"),
        "wrong_ids": ("decode_mask", "LabelOutOfRange"),
        "no_mask": ("read", "MissingMask"),
        "ghost": ("read", "NotFound"),
        escaping: ("read", "UnsafeKey"),
    }
    assert {k: v[:2] for k, v in found.items()} == expected
    assert "100000x100000 = 10000000000 pixels > max_pixels 50000000" in found["bomb"][2]
    assert "20x16" in found["wrong_size"][2] and "32x32" in found["wrong_size"][2]
    assert "7, 200" in found["wrong_ids"][2]
    assert "ghost.jpg" in found["ghost"][2]
    assert all(r["image_uri"] for r in error_list)


def test_empty_prefix_is_a_clear_error(storage_root: str) -> None:
    empty = join(storage_root, "nothing", "here")
    for layout in ("auto", "voc", "generic", "images"):
        with pytest.raises(DatasetError, match="no images found under"):
            build_manifest(empty, layout=layout)
    with pytest.raises(DatasetError, match="no images found under"):
        dataset_info(empty)
    # A root that has only split files and no images says so too.
    _put(storage_root, "voc/ImageSets/Segmentation/train.txt", b"a\nb\n")
    _put(storage_root, "voc/JPEGImages/readme.txt", b"no images")
    with pytest.raises(DatasetError, match=r"no images found under .*JPEGImages"):
        build_manifest(join(storage_root, "voc"), layout="voc")
    with pytest.raises(DatasetError, match="no split 'val'"):
        _put(storage_root, "voc/JPEGImages/a.jpg", _jpeg(np.zeros((8, 8, 3), np.uint8)))
        build_manifest(join(storage_root, "voc"), split="val")


# ----------------------------------------------------------------------------- training


def test_two_workers_each_image_once_per_epoch(
    s3_env: SeaweedS3, bucket: str, tmp_path: Path, ray_local: None
) -> None:
    # On the S3 server only: the sharding is the same on every backend (the reads are
    # tested on both above), and each Ray Train run costs half a minute here.
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.data.batches import iter_train_batches, shuffle_each_epoch

    root = f"s3://{bucket}/voc"
    write_synthetic(root, num_images=12, size=40, seed=1, val_fraction=0.0)
    config = DatasetConfig(rows_per_block=2, decode_batch_size=2)
    # Decoded once here, on warm workers; each epoch then re-runs only the shuffle.
    good, errors = read_dataset(root, split="train", config=config, require_masks=True, cache=True)
    assert errors.count() == 0
    seen_dir = tmp_path / "seen"
    seen_dir.mkdir()

    def train_loop(loop_config: dict[str, Any]) -> None:
        from fcn.transforms import train_transform

        rank = ray.train.get_context().get_world_rank()
        shard = ray.train.get_dataset_shard("train")
        transform = train_transform(32, scale_range=(0.75, 1.25))
        for epoch in range(2):
            ids: list[str] = []
            for batch in iter_train_batches(shard, transform=transform, batch_size=4):
                assert batch.images.shape[1:] == (3, 32, 32), batch.images.shape
                assert batch.masks.shape[1:] == (32, 32) and batch.masks.dtype.is_signed
                ids.extend(batch.image_ids)
            path = os.path.join(loop_config["out"], f"rank{rank}_epoch{epoch}.json")
            with open(path, "w") as f:
                json.dump(ids, f)

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"out": str(seen_dir)},
        # Two 0.5-CPU workers leave one of Ray's 2 CPUs to the decode and shuffle tasks;
        # with {"CPU": 1} each, Ray Data would wait for a CPU forever.
        scaling_config=ScalingConfig(
            num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}
        ),
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="shards"),
        datasets={"train": shuffle_each_epoch(good, "rows")},
    )
    trainer.fit()

    everything = sorted(f"shapes_{i:06d}" for i in range(12))
    orders = []
    for epoch in range(2):
        per_rank = [
            json.loads((seen_dir / f"rank{rank}_epoch{epoch}.json").read_text()) for rank in (0, 1)
        ]
        assert all(per_rank), "each worker gets a share"
        assert sorted(per_rank[0] + per_rank[1]) == everything  # each image exactly once
        orders.append(per_rank[0] + per_rank[1])
    assert orders[0] != orders[1], "a new shuffle each epoch"


# ----------------------------------------------------------------------------- benchmark


def test_bench_read_reports_both_sources(
    tmp_path: Path, s3_env: SeaweedS3, bucket: str, ray_local: None
) -> None:
    local, remote = str(tmp_path / "voc"), f"s3://{bucket}/voc"
    for root in (local, remote):
        write_synthetic(root, num_images=6, size=32, seed=2)
    result = bench_read(local, remote, num_images=5, warmup=False)
    assert result["num_images"] == 5
    for side in ("local", "s3"):
        assert result[side]["images"] == 5 and result[side]["errors"] == 0
        assert result[side]["images_per_s"] > 0 and result[side]["mb_per_s"] > 0
    assert result["s3_over_local"] > 0
    table = format_bench(result)
    assert "local" in table and "s3 / local" in table
