"""Pixel cross-entropy: mean vs sum, ignored pixels, all-ignore batches, class weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fcn.losses import SegmentationLoss, median_frequency_weights, segmentation_loss

pytestmark = pytest.mark.unit

NUM_CLASSES = 4


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    # Not torch.testing.assert_close: its first call imports torch.distributed.tensor (~4 s).
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got, want)


def make_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, 4, 5, 6) logits needing grad and a uint8 target with ~25% of pixels 255."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, NUM_CLASSES, 5, 6, generator=g, requires_grad=True)
    target = torch.randint(0, NUM_CLASSES, (2, 5, 6), generator=g)
    target[torch.rand(2, 5, 6, generator=g) < 0.25] = 255
    return logits, target.to(torch.uint8)


def test_sum_is_mean_times_non_ignored_pixels() -> None:
    logits, target = make_batch()
    count = int((target != 255).sum())
    assert 0 < count < target.numel()
    mean = segmentation_loss(logits, target)
    total = segmentation_loss(logits, target, normalize=False)
    assert_close(total, mean * count)
    # normalize=True is PyTorch's default reduction.
    assert_close(mean, F.cross_entropy(logits, target.long(), ignore_index=255))


@pytest.mark.parametrize("normalize", [True, False])
def test_ignored_pixels_do_not_contribute(normalize: bool) -> None:
    logits, target = make_batch(1)
    ignored = (target == 255).unsqueeze(1).expand_as(logits)
    loss = segmentation_loss(logits, target, normalize=normalize)
    loss.backward()
    assert logits.grad is not None
    assert torch.count_nonzero(logits.grad[ignored]) == 0
    # Changing the scores of ignored pixels leaves the loss unchanged.
    other = logits.detach().masked_fill(ignored, 100.0)
    assert_close(segmentation_loss(other, target, normalize=normalize), loss)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignore_gives_zero_and_zero_gradient(normalize: bool, weighted: bool) -> None:
    logits, _ = make_batch(2)
    target = torch.full((2, 5, 6), 255, dtype=torch.uint8)
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0]) if weighted else None
    loss = segmentation_loss(logits, target, normalize=normalize, weight=weight)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_class_weights() -> None:
    logits, target = make_batch(3)
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0])
    t = target.long()
    valid = t != 255
    # By hand: weighted negative log-likelihood of the true class at each kept pixel.
    nll = -torch.log_softmax(logits, dim=1).gather(1, t.masked_fill(~valid, 0).unsqueeze(1))
    w = weight[t.masked_fill(~valid, 0)] * valid
    by_hand_sum = (nll.squeeze(1) * w).sum()
    total = segmentation_loss(logits, target, normalize=False, weight=weight)
    mean = segmentation_loss(logits, target, weight=weight)
    assert_close(total, by_hand_sum)
    assert_close(mean, by_hand_sum / w.sum())
    assert_close(mean, F.cross_entropy(logits, t, weight=weight, ignore_index=255))


def test_module_matches_function_and_moves_weight() -> None:
    logits, target = make_batch(4)
    weight = torch.tensor([1.0, 1.0, 2.0, 2.0])
    module = SegmentationLoss(normalize=False, weight=weight)
    assert_close(
        module(logits, target), segmentation_loss(logits, target, normalize=False, weight=weight)
    )
    assert "weight" in dict(module.named_buffers())
    moved = module.to(torch.float64).weight
    assert moved is not None
    assert moved.dtype == torch.float64
    assert SegmentationLoss().weight is None


def test_bad_inputs_raise() -> None:
    logits, target = make_batch()
    with pytest.raises(ValueError, match=r"\(2, 4, 5, 6\).*\(2, 6, 5\)"):
        segmentation_loss(logits, target.transpose(1, 2))
    with pytest.raises(TypeError, match="integer"):
        segmentation_loss(logits, target.float())


def test_median_frequency_weights() -> None:
    # Frequencies 0.5, 0.25, 0.25, 0: median of the seen ones 0.25; unseen classes get 1.
    weights = median_frequency_weights([200, 100, 100, 0])
    assert weights == pytest.approx((0.5, 1.0, 1.0, 1.0))
    assert median_frequency_weights([0, 0]) == (1.0, 1.0)  # nothing labelled: no weighting
