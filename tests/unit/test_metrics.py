"""Confusion matrix and FCN metrics against hand-computed values and the reference score.py."""

from __future__ import annotations

import math
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fcn.metrics import ConfusionMatrix, confusion_matrix, per_class_counts, scores

pytestmark = pytest.mark.unit

# One 3x4 image, 5 classes. Class 3 is only ever predicted (a false positive),
# class 4 appears nowhere. 255 is ignore, 7 >= num_classes: both dropped.
NUM_CLASSES = 5
TARGET = np.array(
    [
        [0, 0, 1, 1],
        [0, 2, 2, 255],
        [1, 1, 7, 0],
    ],
    dtype=np.uint8,
)
PRED = np.array(
    [
        [0, 1, 1, 1],
        [0, 2, 3, 2],
        [1, 0, 2, 0],
    ],
    dtype=np.int64,
)
# Kept (gt, pred) pairs: gt 0 -> pred 0, 1, 0, 0; gt 1 -> 1, 1, 1, 0; gt 2 -> 2, 3.
EXPECTED = np.array(
    [
        [3, 1, 0, 0, 0],
        [1, 3, 0, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ],
    dtype=np.int64,
)
# t = row sums = [4, 4, 2, 0, 0], total 10; column sums = [4, 4, 1, 1, 0].
# pixel acc = (3 + 3 + 1) / 10.
PIXEL_ACC = 0.7
# class acc = [3/4, 3/4, 1/2, NaN, NaN] -> mean over the 3 present classes.
MEAN_ACC = (0.75 + 0.75 + 0.5) / 3
# IoU = n_ii / (t_i + p_i - n_ii): 3/5, 3/5, 1/2, 0/1 (false positive only), NaN (absent).
IOU = np.array([0.6, 0.6, 0.5, 0.0, np.nan])
MEAN_IOU = (0.6 + 0.6 + 0.5 + 0.0) / 4
# f.w. IoU: weights t_i / 10 over t_i > 0 -> 0.4 * 0.6 + 0.4 * 0.6 + 0.2 * 0.5.
FW_IOU = 0.58


def fast_hist(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """The FCN reference score.py, verbatim (a = ground truth, b = prediction)."""
    k = (a >= 0) & (a < n)
    return np.bincount(n * a[k].astype(int) + b[k], minlength=n**2).reshape(n, n)


def reference_scores(hist: np.ndarray) -> tuple[float, float, float, float]:
    """The reference score.py's four metrics."""
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = np.diag(hist).sum() / hist.sum()
        mean_acc = np.nanmean(np.diag(hist) / hist.sum(1))
        iu = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
        freq = hist.sum(1) / hist.sum()
        return acc, mean_acc, np.nanmean(iu), (freq[freq > 0] * iu[freq > 0]).sum()


def random_batch(
    seed: int, shape: tuple[int, ...] = (4, 13, 17), n: int = 6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions in [0, n); targets in [0, n + 2) with ~10% set to 255."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, n, shape, generator=g)
    target = torch.randint(0, n + 2, shape, generator=g)
    target[torch.rand(shape, generator=g) < 0.1] = 255
    return pred, target.to(torch.uint8)


def assert_scores_equal(got: dict, want: dict) -> None:
    for key in ("pixel_acc", "mean_acc", "mean_iou", "fw_iou"):
        assert got[key] == pytest.approx(want[key], nan_ok=True), key
    np.testing.assert_allclose(got["iou"], want["iou"])


def test_confusion_matrix_by_hand_numpy() -> None:
    cm = confusion_matrix(PRED, TARGET, NUM_CLASSES)
    assert isinstance(cm, np.ndarray)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, EXPECTED)


def test_confusion_matrix_by_hand_torch() -> None:
    cm = confusion_matrix(torch.from_numpy(PRED), torch.from_numpy(TARGET), NUM_CLASSES)
    assert isinstance(cm, torch.Tensor)
    assert cm.dtype == torch.int64
    np.testing.assert_array_equal(cm.numpy(), EXPECTED)


def test_negative_targets_are_dropped() -> None:
    target = np.array([[-1, 0], [1, 1]])
    pred = np.array([[1, 0], [1, 0]])
    np.testing.assert_array_equal(confusion_matrix(pred, target, 2), [[1, 0], [1, 1]])


def test_scores_by_hand() -> None:
    s = scores(EXPECTED)
    assert s["pixel_acc"] == pytest.approx(PIXEL_ACC)
    assert s["mean_acc"] == pytest.approx(MEAN_ACC)
    assert s["mean_iou"] == pytest.approx(MEAN_IOU)
    assert s["fw_iou"] == pytest.approx(FW_IOU)
    np.testing.assert_allclose(s["iou"], IOU)
    assert s["iou"].dtype == np.float64
    assert all(type(s[k]) is float for k in ("pixel_acc", "mean_acc", "mean_iou", "fw_iou"))
    # torch input gives the same numbers.
    assert_scores_equal(scores(torch.from_numpy(EXPECTED)), s)


def test_per_class_counts_by_hand_and_summed_over_images() -> None:
    c = per_class_counts(EXPECTED)
    np.testing.assert_array_equal(c["gt_pixels"], [4, 4, 2, 0, 0])
    np.testing.assert_array_equal(c["pred_pixels"], [4, 4, 1, 1, 0])
    np.testing.assert_array_equal(c["intersection"], [3, 3, 1, 0, 0])
    np.testing.assert_array_equal(c["union"], [5, 5, 2, 1, 0])
    # Per-image rows (as in the class_metrics table) sum to the dataset IoU exactly.
    pred, target = random_batch(0)
    per_image = [
        per_class_counts(confusion_matrix(p, t, 6)) for p, t in zip(pred, target, strict=True)
    ]
    inter = sum(c["intersection"] for c in per_image)
    union = sum(c["union"] for c in per_image)
    with np.errstate(invalid="ignore"):
        summed_iou = inter / union
    np.testing.assert_array_equal(summed_iou, scores(confusion_matrix(pred, target, 6))["iou"])


@pytest.mark.filterwarnings("error")
def test_all_ignore_gives_nan_without_warnings() -> None:
    target = np.full((5, 7), 255, dtype=np.uint8)
    pred = np.zeros((5, 7), dtype=np.int64)
    cm = confusion_matrix(pred, target, 3)
    np.testing.assert_array_equal(cm, np.zeros((3, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = scores(cm)
        s_torch = ConfusionMatrix(3).scores()
    for key in ("pixel_acc", "mean_acc", "mean_iou", "fw_iou"):
        assert math.isnan(s[key]) and math.isnan(s_torch[key]), key
    assert np.isnan(s["iou"]).all()


@pytest.mark.filterwarnings("error")
def test_absent_class_is_excluded_without_warnings() -> None:
    one = np.array([[0, 0], [0, 5]])  # class 0 absent from gt and prediction
    s = scores(one)
    assert (s["pixel_acc"], s["mean_acc"], s["mean_iou"], s["fw_iou"]) == (1.0, 1.0, 1.0, 1.0)
    assert math.isnan(s["iou"][0])


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_out_of_range_prediction_raises(kind: str) -> None:
    target = np.array([[0, 1], [1, 255]])
    pred = np.array([[0, 1], [3, 0]])
    with pytest.raises(ValueError, match=r"\[0, 1\].*\[0, 3\]"):
        if kind == "torch":
            confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 2)
        else:
            confusion_matrix(pred, target, 2)


def test_out_of_range_prediction_on_dropped_pixel_is_fine() -> None:
    target = np.array([[0, 255], [9, 1]])
    pred = np.array([[0, 200], [-1, 1]])
    np.testing.assert_array_equal(confusion_matrix(pred, target, 2), [[1, 0], [0, 1]])


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        confusion_matrix(np.zeros((2, 3), int), np.zeros((3, 2), int), 2)
    with pytest.raises(TypeError, match="integer"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 2), int), 2)
    with pytest.raises(TypeError, match="both"):
        confusion_matrix(torch.zeros(2, 2, dtype=torch.long), np.zeros((2, 2), int), 2)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="square"):
        scores(np.zeros((2, 3), int))


def test_batch_input_equals_sum_over_images() -> None:
    pred, target = random_batch(1)
    batch = confusion_matrix(pred, target, 6)
    per_image = sum(confusion_matrix(p, t, 6) for p, t in zip(pred, target, strict=True))
    assert torch.equal(batch, per_image)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_numpy_torch_and_reference_fast_hist_agree(seed: int) -> None:
    n = 6
    pred, target = random_batch(seed, shape=(3, 31, 23), n=n)
    cm_torch = confusion_matrix(pred, target, n)
    cm_numpy = confusion_matrix(pred.numpy(), target.numpy(), n)
    ref = fast_hist(target.numpy().reshape(-1), pred.numpy().reshape(-1), n)
    np.testing.assert_array_equal(cm_torch.numpy(), cm_numpy)
    np.testing.assert_array_equal(cm_numpy, ref)
    s = scores(cm_numpy)
    assert (s["pixel_acc"], s["mean_acc"], s["mean_iou"], s["fw_iou"]) == pytest.approx(
        reference_scores(ref)
    )


def test_accumulator_updates_merge_and_reset() -> None:
    pred, target = random_batch(3)
    whole = ConfusionMatrix(6)
    whole.update(pred, target)
    a, b = ConfusionMatrix(6), ConfusionMatrix(6)
    a.update(pred[:1], target[:1])
    a.update(pred[1:2].numpy(), target[1:2].numpy())  # numpy input is accepted too
    b.update(pred[2:], target[2:])
    assert torch.equal((a + b).matrix, whole.matrix)
    assert a.matrix.sum() < whole.matrix.sum()  # __add__ leaves its operands alone
    a += b
    assert torch.equal(a.matrix, whole.matrix)
    assert whole.matrix.dtype == torch.int64
    assert_scores_equal(whole.scores(), scores(confusion_matrix(pred, target, 6)))
    assert whole.reduce() is whole  # no process group: a no-op
    assert torch.equal(whole.matrix, a.matrix)
    whole.reset()
    assert int(whole.matrix.sum()) == 0
    with pytest.raises(ValueError, match="different"):
        a + ConfusionMatrix(5)


def _reduce_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        pred, target = random_batch(4)
        cm = ConfusionMatrix(6)
        cm.update(pred[rank::world_size], target[rank::world_size])
        cm.reduce()
        torch.save(cm.matrix, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_reduce_across_two_processes(tmp_path: Path) -> None:
    # spawn, not fork: in the full suite this process has Ray, Prefect and their threads
    # running by now, and a forked child inherits them mid-state (a child died at start in
    # CI that way). Spawn re-imports torch in each child, a few seconds.
    mp.start_processes(
        _reduce_worker,
        args=(2, str(tmp_path / "dist_init"), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    pred, target = random_batch(4)
    expected = confusion_matrix(pred, target, 6)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got.dtype == torch.int64
        assert torch.equal(got, expected)


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    pred, target = random_batch(5, shape=(2, 64, 48), n=21)
    cpu = confusion_matrix(pred, target, 21)
    cuda = confusion_matrix(pred.cuda(), target.cuda(), 21)
    assert cuda.device.type == "cuda"
    assert torch.equal(cuda.cpu(), cpu)
    acc = ConfusionMatrix(21, device="cuda")
    acc.update(pred.cuda(), target.cuda())
    acc.update(pred, target)  # CPU input into a CUDA accumulator
    assert acc.matrix.device.type == "cuda"
    assert torch.equal(acc.matrix.cpu(), 2 * cpu)
    with pytest.raises(ValueError, match="predictions"):
        confusion_matrix(pred.cuda() + 21, target.cuda(), 21)
