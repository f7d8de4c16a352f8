"""Segmentation metrics from one confusion matrix, as in the FCN paper.

The matrix is a bincount (the reference ``score.py`` ``fast_hist``; torchvision
``references/segmentation/utils.py`` ``ConfusionMatrix``): rows are ground
truth, columns are prediction. Pixels whose target is ``ignore_index`` (255 in
VOC), negative or ``>= num_classes`` are dropped. The four paper metrics are
computed once, in :func:`scores`, from the matrix summed over a whole split.

A prediction outside ``0 .. num_classes - 1`` on a kept pixel raises
``ValueError``: a model cannot produce one, so it signals a bug (wrong
``num_classes``, a label map passed as the prediction) that silent dropping
would hide.
"""

from __future__ import annotations

from typing import Any, overload

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "PAPER_METRICS",
    "ConfusionMatrix",
    "confusion_matrix",
    "nan_to_none",
    "per_class_counts",
    "scores",
    "scores_from_counts",
]

PAPER_METRICS: dict[str, str] = {
    "pixel_acc": "pixel acc",
    "mean_acc": "mean acc",
    "mean_iou": "mean IoU",
    "fw_iou": "f.w. IoU",
}
"""The paper's four metrics (its Table 3 onwards): keys of :func:`scores`, and column titles."""


def _check_shapes_and_dtypes(pred: Any, target: Any) -> None:
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(
            f"pred and target must have the same shape, got pred {tuple(pred.shape)} "
            f"and target {tuple(target.shape)}"
        )
    for name, x in (("pred", pred), ("target", target)):
        if isinstance(x, torch.Tensor):
            integer = not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)
        else:
            integer = np.issubdtype(x.dtype, np.integer)
        if not integer:
            raise TypeError(f"{name} must hold integer class ids, got dtype {x.dtype}")


def _out_of_range_error(lo: int, hi: int, num_classes: int) -> ValueError:
    return ValueError(
        f"predictions must be class ids in [0, {num_classes - 1}] where the target is "
        f"kept, got values in [{lo}, {hi}] (wrong num_classes?)"
    )


@overload
def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = ...
) -> torch.Tensor: ...
@overload
def confusion_matrix(
    pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = ...
) -> np.ndarray: ...
def confusion_matrix(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
) -> np.ndarray | torch.Tensor:
    """Count (ground truth, prediction) pairs over all pixels.

    Args:
        pred: predicted class ids, any shape, e.g. (H, W) or (N, H, W).
        target: ground-truth class ids, same shape as ``pred``.
        num_classes: number of classes ``n``.
        ignore_index: target value whose pixels are dropped (as are targets < 0 or >= n).

    Returns:
        An (n, n) int64 matrix, rows = ground truth, columns = prediction: a numpy
        array for numpy input, a tensor on the inputs' device for tensor input.

    Raises:
        ValueError: shapes differ, or a kept pixel has a prediction outside [0, n).
        TypeError: non-integer inputs, or one numpy array and one tensor.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not (
        (isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor))
        or (isinstance(pred, np.ndarray) and isinstance(target, np.ndarray))
    ):
        raise TypeError(
            "pred and target must both be numpy arrays or both be torch tensors, got "
            f"{type(pred).__name__} and {type(target).__name__}"
        )
    _check_shapes_and_dtypes(pred, target)
    n = num_classes
    if isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor):
        if pred.device != target.device:
            raise ValueError(
                f"pred and target must be on one device, got {pred.device} and {target.device}"
            )
        t = target.reshape(-1).long()
        p = pred.reshape(-1).long()
        keep = (t >= 0) & (t < n) & (t != ignore_index)
        t, p = t[keep], p[keep]
        if p.numel() > 0:
            lo, hi = torch.stack(torch.aminmax(p)).tolist()  # one device sync
            if lo < 0 or hi >= n:
                raise _out_of_range_error(lo, hi, n)
        return torch.bincount(n * t + p, minlength=n * n).reshape(n, n)
    if isinstance(pred, np.ndarray) and isinstance(target, np.ndarray):
        a = target.reshape(-1).astype(np.int64)
        b = pred.reshape(-1).astype(np.int64)
        k = (a >= 0) & (a < n) & (a != ignore_index)
        a, b = a[k], b[k]
        if b.size > 0:
            lo, hi = int(b.min()), int(b.max())
            if lo < 0 or hi >= n:
                raise _out_of_range_error(lo, hi, n)
        return np.bincount(n * a + b, minlength=n * n).reshape(n, n).astype(np.int64)
    raise AssertionError("unreachable: input types checked above")


def _as_numpy_matrix(confusion: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(confusion, torch.Tensor):
        confusion = confusion.detach().cpu().numpy()
    m = np.asarray(confusion)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion matrix must be square (n, n), got shape {m.shape}")
    return m.astype(np.int64)


def per_class_counts(confusion: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
    """Per-class pixel counts of one confusion matrix (one image or a whole split).

    Counts add up across images, so summing ``intersection`` and ``union`` over the
    images of a run and dividing gives the run's IoU exactly.

    Args:
        confusion: (n, n) matrix, rows = ground truth, columns = prediction.

    Returns:
        int64 arrays of length n: ``gt_pixels`` (row sums, t_i), ``pred_pixels``
        (column sums), ``intersection`` (diagonal, n_ii) and ``union``
        (gt + pred - intersection).
    """
    m = _as_numpy_matrix(confusion)
    gt = m.sum(axis=1)
    pred = m.sum(axis=0)
    inter = np.diag(m).copy()
    return {
        "gt_pixels": gt,
        "pred_pixels": pred,
        "intersection": inter,
        "union": gt + pred - inter,
    }


def _nanmean(x: np.ndarray) -> float:
    """Mean over non-NaN entries; NaN (and no warning) when there are none."""
    valid = x[~np.isnan(x)]
    return float(valid.mean()) if valid.size else float("nan")


def scores(confusion: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """The FCN paper's metrics (section 5) from a confusion matrix.

    Args:
        confusion: (n, n) matrix, rows = ground truth, columns = prediction.

    Returns:
        See :func:`scores_from_counts`.
    """
    c = per_class_counts(confusion)
    return scores_from_counts(c["gt_pixels"], c["intersection"], c["union"])


def scores_from_counts(
    gt_pixels: np.ndarray, intersection: np.ndarray, union: np.ndarray
) -> dict[str, Any]:
    """The FCN paper's metrics (section 5) from per-class counts (all four need only these).

    With t_i = sum_j n_ij the ground-truth pixels of class i:
    pixel acc = sum_i n_ii / sum_i t_i; mean acc = nanmean_i n_ii / t_i;
    IoU_i = n_ii / (t_i + sum_j n_ji - n_ii); mean IoU = nanmean_i IoU_i;
    f.w. IoU = sum_{i: t_i > 0} (t_i / sum_k t_k) IoU_i. A class absent from both
    ground truth and prediction has IoU NaN and is left out of the mean; a class
    only predicted (t_i = 0) has IoU 0 and counts. All-zero counts (an image that is
    all ignore) give NaN for every metric, without warnings.

    Args:
        gt_pixels: t_i per class (:func:`per_class_counts`; sums over images are fine).
        intersection: n_ii per class.
        union: t_i + sum_j n_ji - n_ii per class.

    Returns:
        ``pixel_acc``, ``mean_acc``, ``mean_iou``, ``fw_iou`` as floats and ``iou``,
        the per-class float64 array (NaN for absent classes).
    """
    gt = np.asarray(gt_pixels, dtype=np.float64)
    inter = np.asarray(intersection, dtype=np.float64)
    union = np.asarray(union, dtype=np.float64)
    total = gt.sum()
    # 0/0 -> NaN is the intended result for empty classes and empty matrices.
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
        class_acc = inter / gt
        pixel_acc = float(inter.sum() / total) if total > 0 else float("nan")
        present = gt > 0
        fw_iou = float((gt[present] / total * iou[present]).sum()) if total > 0 else float("nan")
    return {
        "pixel_acc": pixel_acc,
        "mean_acc": _nanmean(class_acc),
        "mean_iou": _nanmean(iou),
        "fw_iou": fw_iou,
        "iou": iou,
    }


def nan_to_none(value: Any) -> Any:
    """Metric values with NaN ("undefined") as None and arrays as lists: JSON and Arrow ready.

    Floats, numpy scalars and arrays, tensors, lists and dicts (recursively); anything else
    is returned as it is.

    Args:
        value: A metric value, or a dict of them (e.g. :func:`scores`).
    """
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [nan_to_none(v) for v in value]
    if isinstance(value, float | np.floating):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


class ConfusionMatrix:
    """A confusion matrix accumulated over batches, mergeable and all-reducible.

    Args:
        num_classes: number of classes n.
        ignore_index: target value whose pixels are dropped.
        device: where the (n, n) int64 matrix lives (CPU when None). Use the
            CUDA device with the nccl backend, since :meth:`reduce` all-reduces it
            in place.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        device: torch.device | str | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"pixels={int(self.matrix.sum())}, device={self.matrix.device})"
        )

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """Add one batch; numpy arrays and tensors on any device are accepted.

        Args:
            pred: predicted class ids, any shape.
            target: ground-truth class ids, same shape as ``pred``.
        """
        device = pred.device if isinstance(pred, torch.Tensor) else self.matrix.device
        p = torch.as_tensor(pred, device=device)
        t = torch.as_tensor(target, device=device)
        counts = confusion_matrix(p, t, self.num_classes, self.ignore_index)
        self.matrix += counts.to(self.matrix.device)

    def _check_compatible(self, other: ConfusionMatrix) -> None:
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                "cannot merge confusion matrices with different (num_classes, ignore_index): "
                f"{(self.num_classes, self.ignore_index)} and "
                f"{(other.num_classes, other.ignore_index)}"
            )

    def __add__(self, other: object) -> ConfusionMatrix:
        if not isinstance(other, ConfusionMatrix):
            return NotImplemented
        self._check_compatible(other)
        merged = ConfusionMatrix(self.num_classes, self.ignore_index, device=self.matrix.device)
        merged.matrix = self.matrix + other.matrix.to(self.matrix.device)
        return merged

    def __iadd__(self, other: object) -> ConfusionMatrix:
        if not isinstance(other, ConfusionMatrix):
            return NotImplemented
        self._check_compatible(other)
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def reset(self) -> None:
        """Zero the counts."""
        self.matrix.zero_()

    def reduce(self, group: dist.ProcessGroup | None = None) -> ConfusionMatrix:
        """Sum the matrix over all ranks in place; a no-op without torch.distributed.

        Args:
            group: process group to reduce over (the default group when None).

        Returns:
            self, so that ``cm.reduce().scores()`` reads naturally.
        """
        if dist.is_available() and dist.is_initialized():
            # A collective: every rank of the group must call it, with the same
            # shape. It is meant to run once after the last update of an
            # evaluation, not per batch: counts are additive, so one all-reduce of
            # n*n int64 (exact; float32 would lose counts past 2**24 pixels) gives
            # every rank the whole split's matrix, and ranks wait on each other
            # only once. Call scores() after it so all ranks report equal numbers.
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM, group=group)
        return self

    def scores(self) -> dict[str, Any]:
        """The paper's metrics of the accumulated matrix; see :func:`scores`."""
        return scores(self.matrix)
