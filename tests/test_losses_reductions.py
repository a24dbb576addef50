"""Reductions (methods.md §0.7) as per-token coefficients, against the formulas written out with loops."""

import pytest
import torch

from trl_opd.losses import reduce_token_losses, token_loss_coefficients


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    losses = torch.rand(4, 6, generator=generator, dtype=torch.float64)
    mask = torch.tensor(
        [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool
    )
    weights = torch.rand(4, 6, generator=generator, dtype=torch.float64)
    return losses, mask, weights


def loop_reduction(losses, mask, weights, reduction, num_items=None, num_sequences=None):
    """The step-loss formulas of §0.7 with X_{b,t} = m w ℓ, written with explicit loops."""
    rows, cols = losses.shape
    x = [
        [float(mask[b, t]) * weights[b, t].item() * losses[b, t].item() for t in range(cols)]
        for b in range(rows)
    ]
    lengths = [sum(int(mask[b, t]) for t in range(cols)) for b in range(rows)]
    if reduction == "token_mean":
        return sum(map(sum, x)) / (num_items if num_items is not None else max(sum(lengths), 1))
    if reduction == "token_mean_microbatch":
        return sum(map(sum, x)) / max(sum(lengths), 1)
    if reduction == "sequence_mean":
        valid = [b for b in range(rows) if lengths[b] >= 1]
        count = num_sequences if num_sequences is not None else len(valid)
        return sum(sum(x[b]) / lengths[b] for b in valid) / count
    selected = sum(float(mask[b, t]) * weights[b, t].item() for b in range(rows) for t in range(cols))
    return sum(map(sum, x)) / selected


@pytest.mark.parametrize(
    "reduction", ["token_mean", "token_mean_microbatch", "sequence_mean", "weighted_mean"]
)
@pytest.mark.parametrize("use_weights", [False, True])
def test_reductions_match_formulas(reduction, use_weights):
    losses, mask, weights = batch()
    if not use_weights:
        weights_arg, weights = None, torch.ones_like(losses)
    else:
        weights_arg = weights
    got = reduce_token_losses(losses, mask, weights_arg, reduction=reduction)
    assert got.item() == pytest.approx(loop_reduction(losses, mask, weights, reduction), rel=1e-12)
    coefficients = token_loss_coefficients(mask, weights_arg, reduction=reduction)
    assert coefficients.shape == mask.shape and not coefficients.requires_grad
    assert (coefficients[~mask] == 0).all()


def test_explicit_normalisers():
    losses, mask, weights = batch(1)
    got = reduce_token_losses(losses, mask, weights, reduction="token_mean", num_items=torch.tensor(20.0))
    assert got.item() == pytest.approx(
        loop_reduction(losses, mask, weights, "token_mean", num_items=20), rel=1e-12
    )
    got = reduce_token_losses(losses, mask, weights, reduction="sequence_mean", num_sequences=8)
    expected = loop_reduction(losses, mask, weights, "sequence_mean", num_sequences=8)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_token_mean_gradient_accumulation_equivalence():
    # One micro-batch of 4 rows vs two of 2 rows with num_items = N_step: identical gradients.
    losses, mask, weights = batch(2)
    n_step = mask.sum()
    whole = losses.clone().requires_grad_(True)
    reduce_token_losses(whole, mask, weights, num_items=n_step).backward()
    halves = losses.clone().requires_grad_(True)
    total = sum(
        reduce_token_losses(halves[rows], mask[rows], weights[rows], num_items=n_step)
        for rows in (slice(0, 2), slice(2, 4))
    )
    total.backward()
    torch.testing.assert_close(whole.grad, halves.grad, rtol=1e-12, atol=0)
    # and two processes each passing N_step / 2, whose gradients DDP averages
    averaged = losses.clone().requires_grad_(True)
    per_rank = [
        reduce_token_losses(averaged[rows], mask[rows], weights[rows], num_items=n_step / 2)
        for rows in (slice(0, 2), slice(2, 4))
    ]
    (sum(per_rank) / 2).backward()
    torch.testing.assert_close(whole.grad, averaged.grad, rtol=1e-12, atol=0)


def test_garbage_at_unsupervised_positions_does_not_leak():
    losses, mask, weights = batch(3)
    dirty = losses.clone()
    dirty[~mask] = float("nan")
    dirty[2, 0] = float("inf")
    for reduction in ("token_mean", "sequence_mean", "weighted_mean"):
        leaf = dirty.clone().requires_grad_(True)
        got = reduce_token_losses(leaf, mask, weights, reduction=reduction)
        assert got.item() == pytest.approx(loop_reduction(losses, mask, weights, reduction), rel=1e-12)
        got.backward()
        assert torch.isfinite(leaf.grad).all()


def test_degenerate_batches_give_zero_not_nan():
    losses = torch.rand(2, 3)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    for reduction in ("token_mean", "token_mean_microbatch", "sequence_mean", "weighted_mean"):
        assert reduce_token_losses(losses, empty, reduction=reduction).item() == 0.0
    zero_weights = torch.zeros(2, 3)
    assert (
        reduce_token_losses(losses, torch.ones(2, 3), zero_weights, reduction="weighted_mean").item() == 0.0
    )


def test_bad_inputs_raise():
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="reduction"):
        token_loss_coefficients(mask, reduction="mean")
    with pytest.raises(ValueError, match="weights shape"):
        token_loss_coefficients(mask, torch.ones(2, 4))
    with pytest.raises(ValueError, match="non-negative"):
        token_loss_coefficients(mask, -torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        token_loss_coefficients(torch.ones(6))
    with pytest.raises(ValueError, match="per_token shape"):
        reduce_token_losses(torch.ones(2, 4), mask)
