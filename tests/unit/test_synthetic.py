"""The synthetic shapes dataset: determinism, content, thin structures, splits."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from fcn.synthetic import (
    CLASS_NAMES,
    IGNORE_INDEX,
    NUM_CLASSES,
    is_val_index,
    make_dataset,
    make_sample,
)

pytestmark = pytest.mark.unit

DISC = CLASS_NAMES.index("disc")
RING = CLASS_NAMES.index("ring")
LINE = CLASS_NAMES.index("line")


def test_same_seed_and_index_give_identical_arrays() -> None:
    a_image, a_mask = make_sample(3, seed=5)
    b_image, b_mask = make_sample(3, seed=5)
    assert np.array_equal(a_image, b_image) and np.array_equal(a_mask, b_mask)
    for other in (make_sample(4, seed=5), make_sample(3, seed=6)):
        assert not np.array_equal(a_image, other[0]) and not np.array_equal(a_mask, other[1])


def test_samples_do_not_depend_on_global_random_state() -> None:
    # The legacy global state is exactly what must not matter.
    np.random.seed(0)  # noqa: NPY002
    first = make_sample(1)
    np.random.seed(1)  # noqa: NPY002
    np.random.random(10)  # noqa: NPY002
    second = make_sample(1)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])


@pytest.mark.parametrize(("size", "shape"), [(128, (128, 128)), ((48, 80), (48, 80))])
def test_dtype_and_shape(size: int | tuple[int, int], shape: tuple[int, int]) -> None:
    image, mask = make_sample(0, size=size)
    assert image.dtype == np.uint8 and image.shape == (*shape, 3)
    assert mask.dtype == np.uint8 and mask.shape == shape
    assert set(np.unique(mask).tolist()) <= {*range(NUM_CLASSES), IGNORE_INDEX}


def test_every_class_appears_in_a_few_samples() -> None:
    counts = np.zeros(256, dtype=np.int64)
    for i in range(12):
        counts += np.bincount(make_sample(i, size=96, ignore_border=0)[1].ravel(), minlength=256)
    assert (counts[:NUM_CLASSES] > 0).all()
    assert counts[NUM_CLASSES:].sum() == 0  # exact masks: no ignore pixels
    # Background dominates, as in VOC, but objects are not rare.
    assert 0.5 < counts[0] / counts.sum() < 0.9


def _surviving_erosion(mask: np.ndarray, size: int) -> int:
    """Pixels left by eroding a boolean mask with a size x size square."""
    return int(sliding_window_view(mask, (size, size)).all(axis=(-2, -1)).sum())


@pytest.mark.parametrize(("size", "line_width", "ring_width"), [(128, 6, 7), (64, 3, 4)])
def test_strokes_and_rings_are_thin(size: int, line_width: int, ring_width: int) -> None:
    """Strokes and rings are narrower than a stride-16 cell: erosion by a square one
    pixel wider than their maximum width leaves (almost) nothing, unlike discs."""
    pixels = {LINE: 0, RING: 0}
    survivors = {LINE: 0, RING: 0}
    disc_survivors = 0
    for i in range(12):
        mask = make_sample(i, size=size, ignore_border=0)[1]
        assert (mask == LINE).any(), f"sample {i} has no stroke"
        for cls, width in ((LINE, line_width), (RING, ring_width)):
            pixels[cls] += int((mask == cls).sum())
            survivors[cls] += _surviving_erosion(mask == cls, width + 1)
        disc_survivors += _surviving_erosion(mask == DISC, ring_width + 1)
    # Only crossings and overlaps can hold a larger square.
    assert survivors[LINE] <= 0.01 * pixels[LINE]
    assert survivors[RING] <= 0.01 * pixels[RING]
    assert disc_survivors > 0


def test_ignore_border_adds_255_bands_only() -> None:
    image, mask = make_sample(2, ignore_border=0)
    b_image, b_mask = make_sample(2)  # the default: a 1 px band
    assert np.array_equal(image, b_image)
    band = b_mask == IGNORE_INDEX
    assert band.any() and not (mask == IGNORE_INDEX).any()
    assert np.array_equal(b_mask[~band], mask[~band])
    # Every band pixel touches (8-neighbourhood) an object pixel of the exact mask.
    windows = sliding_window_view(np.pad(mask > 0, 1), (3, 3))
    near_object = np.asarray(windows.any(axis=(-2, -1)))
    assert near_object[band].all()
    # A wider band covers more.
    assert (make_sample(2, ignore_border=2)[1] == IGNORE_INDEX).sum() > band.sum()


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        make_sample(-1)
    with pytest.raises(ValueError):
        make_sample(0, size=8)
    with pytest.raises(ValueError):
        make_dataset(0)
    with pytest.raises(ValueError):
        make_dataset(10, val_fraction=1.0)


def test_split_rule_is_deterministic_even_and_prefix_stable() -> None:
    dataset = make_dataset(50, size=32, seed=1, val_fraction=0.2)
    val = dataset.ids("val")
    assert val == [f"shapes_{i:06d}" for i in range(4, 50, 5)]
    assert len(dataset.ids("train")) == 40
    assert sorted(val + dataset.ids("train")) == dataset.ids()
    assert make_dataset(50, size=32, seed=1).ids("val") == val
    # A sample's split does not depend on the dataset's length.
    assert make_dataset(20, size=32, seed=1).ids("val") == val[:4]
    assert not any(is_val_index(i, 0.0) for i in range(100))
    # Decimal fractions are read exactly: 0.29 gives exactly 29 of every 100.
    assert sum(is_val_index(i, 0.29) for i in range(100)) == 29


def test_dataset_items_are_the_samples() -> None:
    dataset = make_dataset(6, size=40, seed=3, val_fraction=0.5)
    assert len(dataset) == 6 and dataset.class_names == CLASS_NAMES
    items = list(dataset)
    assert [s.image_id for s in items] == dataset.ids()
    assert [s.split for s in items] == ["train", "val"] * 3
    image, mask = make_sample(4, size=40, seed=3)
    assert np.array_equal(items[4].image, image) and np.array_equal(items[4].mask, mask)
    assert dataset[-1].index == 5
    with pytest.raises(IndexError):
        dataset[6]
    # The description is tiny and pickles, so workers can make disjoint slices.
    clone = pickle.loads(pickle.dumps(dataset))
    assert np.array_equal(clone[2].mask, items[2].mask)
