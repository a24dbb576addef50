"""trl_opd.weighting against brute-force formulas written independently here (loops, numpy, float64)."""

import itertools
import math

import numpy as np
import pytest
import torch

from trl_opd.weighting import evidence_mask, position_weights, tip_importance_sample, tip_mask, tip_quadrants


# ---------------------------------------------------------------------------------------------------------
# Brute-force references
# ---------------------------------------------------------------------------------------------------------


def budget(length, ratio):
    """k = max(1, floor(rho * L)) with exact rational arithmetic for ratios given as decimals."""
    if length == 0:
        return 0
    from fractions import Fraction

    return max(1, math.floor(Fraction(str(ratio)) * length))


def valid_cells(mask):
    return [(b, t) for b in range(len(mask)) for t in range(len(mask[b])) if mask[b][t]]


def minmax(values):
    low, high = min(values), max(values)
    return [(v - low) / max(high - low, 1e-8) for v in values]


def reference_scores(entropy, divergence, mask, strategy, clip_quantile=0.98, clip=True):
    """Score of every valid (b, t), statistics over all valid tokens, as TIP Eq. 7 / §7.3 / App. B.2 say."""
    cells = valid_cells(mask)
    h = [float(entropy[b][t]) for b, t in cells]
    d = [float(divergence[b][t]) for b, t in cells]
    if clip:
        cap = float(np.quantile(np.array(h), clip_quantile))
        h = [min(v, cap) for v in h]
    h_hat, d_hat = minmax(h), minmax(d)
    if strategy == "soft_or":
        scores = [a + c - a * c for a, c in zip(h_hat, d_hat)]
    elif strategy == "q3":
        scores = [dv * (1 - a) for a, dv in zip(h_hat, d)]
    else:
        scores = d
    return dict(zip(cells, scores))


def reference_selection(scores, mask, ratio, scope):
    """Explicit sort per row (or over the flattened batch); ties to the earlier position."""
    rows, width = len(mask), len(mask[0])
    selected = [[False] * width for _ in range(rows)]
    if scope == "sequence":
        groups = [[cell for cell in scores if cell[0] == b] for b in range(rows)]
    else:
        groups = [list(scores)]
    for cells in groups:
        cells.sort(key=lambda cell: (-scores[cell], cell[0] * width + cell[1]))
        for b, t in cells[: budget(len(cells), ratio)]:
            selected[b][t] = True
    return selected


def ragged_batch(seed, rows=5, width=12):
    """Random float64 entropy and divergence; padding left, right and inside; a full and an empty row."""
    generator = torch.Generator().manual_seed(seed)
    entropy = torch.rand(rows, width, generator=generator, dtype=torch.float64) * 3
    divergence = torch.rand(rows, width, generator=generator, dtype=torch.float64)
    mask = torch.ones(rows, width, dtype=torch.bool)
    mask[0, :4] = False  # left padding
    mask[1, 7:] = False  # right padding
    mask[2, 3:6] = False  # padding inside the row
    mask[3] = False  # no valid token at all
    # row 4 is full; NaN in padding must not leak into anything.
    entropy[3, 0] = float("nan")
    divergence[0, 0] = float("inf")
    return entropy, divergence, mask


# ---------------------------------------------------------------------------------------------------------
# tip_mask: deterministic strategies
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["soft_or", "q3", "divergence_only"])
@pytest.mark.parametrize("scope", ["sequence", "batch"])
@pytest.mark.parametrize("ratio", [0.5, 0.2, 1.0, 0.29])
def test_tip_mask_matches_brute_force(strategy, scope, ratio):
    for seed in range(3):
        entropy, divergence, mask = ragged_batch(seed)
        scores = reference_scores(entropy.tolist(), divergence.tolist(), mask.tolist(), strategy)
        expected = reference_selection(scores, mask.tolist(), ratio, scope)
        got = tip_mask(entropy, divergence, mask, ratio=ratio, strategy=strategy, scope=scope)
        assert got.dtype == torch.bool
        assert got.tolist() == expected
        assert not (got & ~mask).any()


def test_tip_mask_budget_counts_and_short_rows():
    # L_b < 1/rho: rows with 1, 2 and 3 valid tokens still keep one at rho = 0.3; an empty row keeps none.
    mask = torch.zeros(5, 6, dtype=torch.bool)
    mask[0, :1] = mask[1, 2:4] = mask[2, 3:6] = True
    mask[4] = True
    entropy = torch.rand(5, 6, dtype=torch.float64)
    divergence = torch.rand(5, 6, dtype=torch.float64)
    for scope, expected in [("sequence", [1, 1, 1, 0, 1]), ("batch", None)]:
        got = tip_mask(entropy, divergence, mask, ratio=0.3, scope=scope)
        if expected is None:
            assert got.sum().item() == math.floor(0.3 * 12)
        else:
            assert got.sum(dim=1).tolist() == expected
    assert tip_mask(entropy, divergence, torch.zeros_like(mask)).sum() == 0


def test_tip_mask_budget_is_exact_for_decimal_ratios():
    # 0.29 * 100 = 28.999999999999996 in binary floating point; the budget must still be 29.
    mask = torch.ones(1, 100, dtype=torch.bool)
    scores = torch.arange(100, dtype=torch.float64).unsqueeze(0)
    got = tip_mask(scores, scores, mask, ratio=0.29, strategy="divergence_only")
    assert got.sum().item() == 29
    assert got[0, 71:].all() and not got[0, :71].any()


def test_tip_mask_ties_go_to_the_earlier_position():
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    divergence = torch.tensor([[9.0, 1.0, 2.0, 2.0, 1.0, 2.0, 0.5, 9.0]], dtype=torch.float64)
    entropy = torch.zeros_like(divergence)
    got = tip_mask(entropy, divergence, mask, ratio=0.34, strategy="divergence_only")  # k = 2 of 6
    assert got.nonzero()[:, 1].tolist() == [2, 3]
    # all scores equal (constant entropy and divergence, min-max range 0): the first k valid positions.
    flat = torch.ones(1, 8, dtype=torch.float64)
    assert tip_mask(flat, flat, mask, ratio=0.5).nonzero()[:, 1].tolist() == [1, 2, 3]
    # Many ties (large enough for an unstable sort to reorder them): still the earliest tied positions.
    scores = torch.randint(0, 2, (1, 5000), generator=torch.Generator().manual_seed(0)).double()
    got = tip_mask(scores, scores, torch.ones(1, 5000), ratio=0.2, strategy="divergence_only")
    expected = [t for t in range(5000) if scores[0, t] == 1][:1000]
    assert got.nonzero()[:, 1].tolist() == expected


def test_soft_or_clips_entropy_outliers():
    # Three huge entropies among 200 tokens: the 98% cap changes which tokens win; the reference without the
    # clip must differ, so this test fails for an implementation that forgets the clip.
    generator = torch.Generator().manual_seed(7)
    entropy = torch.rand(4, 50, generator=generator, dtype=torch.float64)
    divergence = torch.rand(4, 50, generator=generator, dtype=torch.float64)
    entropy[0, 3] = entropy[1, 10] = entropy[2, 20] = 1000.0
    mask = torch.ones(4, 50, dtype=torch.bool)
    lists = entropy.tolist(), divergence.tolist(), mask.tolist()
    clipped = reference_selection(reference_scores(*lists, "soft_or"), lists[2], 0.5, "sequence")
    unclipped_scores = reference_scores(*lists, "soft_or", clip=False)
    unclipped = reference_selection(unclipped_scores, lists[2], 0.5, "sequence")
    assert clipped != unclipped
    assert tip_mask(entropy, divergence, mask).tolist() == clipped


def test_q3_uses_forward_divergence_argument():
    entropy, reverse_kl, mask = ragged_batch(1)
    forward_kl = torch.rand(reverse_kl.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    scores = reference_scores(entropy.tolist(), forward_kl.tolist(), mask.tolist(), "q3")
    expected = reference_selection(scores, mask.tolist(), 0.5, "sequence")
    got = tip_mask(entropy, reverse_kl, mask, strategy="q3", forward_divergence=forward_kl)
    assert got.tolist() == expected
    assert tip_mask(entropy, forward_kl, mask, strategy="q3").tolist() == expected
    # q3 prefers confident tokens: with equal forward KL the lowest-entropy token wins.
    row = torch.tensor([[0.9, 0.1, 0.5]], dtype=torch.float64)
    assert tip_mask(row, torch.ones_like(row), torch.ones(1, 3), ratio=0.34, strategy="q3").tolist() == [
        [False, True, False]
    ]


def test_tip_mask_accepts_low_precision_and_grad_inputs():
    entropy, divergence, mask = ragged_batch(2)
    divergence = divergence.clone().requires_grad_(True)
    expected = tip_mask(entropy, divergence.detach(), mask)
    assert tip_mask(entropy, divergence, mask).tolist() == expected.tolist()
    assert tip_mask(entropy.float(), divergence.float(), mask.float()).shape == mask.shape


# ---------------------------------------------------------------------------------------------------------
# tip_mask: entropy sampling
# ---------------------------------------------------------------------------------------------------------


def test_entropy_sample_counts_subset_and_determinism():
    entropy, divergence, mask = ragged_batch(3)
    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return tip_mask(entropy, divergence, mask, strategy="entropy_sample", generator=generator)

    first, again = draw(11), draw(11)
    assert torch.equal(first, again)
    assert not (first & ~mask).any()
    assert first.sum(dim=1).tolist() == [budget(n, 0.5) for n in mask.sum(dim=1).tolist()]
    batch = tip_mask(entropy, divergence, mask, strategy="entropy_sample", scope="batch", ratio=0.3)
    assert batch.sum().item() == budget(mask.sum().item(), 0.3) and not (batch & ~mask).any()
    # Different seeds give different draws on a large input.
    wide = torch.rand(4, 200, dtype=torch.float64)
    full = torch.ones(4, 200, dtype=torch.bool)
    draws = [
        tip_mask(wide, wide, full, strategy="entropy_sample", generator=torch.Generator().manual_seed(seed))
        for seed in (0, 1)
    ]
    assert not torch.equal(*draws)


def successive_sampling_pair_probabilities(weights):
    """P({i, j}) for two draws without replacement, probability proportional to weights (enumerated)."""
    total = sum(weights)
    probabilities = {}
    for i, j in itertools.permutations(range(len(weights)), 2):
        p = weights[i] / total * weights[j] / (total - weights[i])
        key = tuple(sorted((i, j)))
        probabilities[key] = probabilities.get(key, 0.0) + p
    return probabilities


def test_entropy_sample_follows_sampling_without_replacement():
    weights = [0.5, 1.0, 2.0, 4.0]
    rows = 6000
    entropy = torch.tensor(weights, dtype=torch.float64).repeat(rows, 1)
    mask = torch.ones(rows, 4, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    got = tip_mask(entropy, entropy, mask, strategy="entropy_sample", generator=generator)
    assert got.sum(dim=1).eq(2).all()
    expected = successive_sampling_pair_probabilities(weights)
    for pair, probability in expected.items():
        frequency = (got[:, pair[0]] & got[:, pair[1]]).double().mean().item()
        standard_error = math.sqrt(probability * (1 - probability) / rows)
        assert abs(frequency - probability) < 4 * standard_error + 1e-3, pair


def test_entropy_sample_zero_entropy_tokens_come_last():
    entropy = torch.tensor([[0.0, 0.0, 2.0, 0.0, 1.0, 0.0]] * 50, dtype=torch.float64)
    got = tip_mask(entropy, entropy, torch.ones_like(entropy), ratio=0.34, strategy="entropy_sample")
    assert got[:, [2, 4]].all()
    zero_entropy_only = torch.zeros(1, 4, dtype=torch.float64)
    only_zeros = tip_mask(zero_entropy_only, zero_entropy_only, torch.ones(1, 4), strategy="entropy_sample")
    assert only_zeros.sum() == 2


# ---------------------------------------------------------------------------------------------------------
# Importance-weighted (Poisson) entropy sampling
# ---------------------------------------------------------------------------------------------------------


def test_importance_sample_inclusion_probabilities_and_weights():
    entropy = torch.tensor([[0.2, 0.0, 1.0, 3.0, 9.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    rows = 8000
    selected, weights = tip_importance_sample(
        entropy.repeat(rows, 1), mask.repeat(rows, 1), ratio=0.5, generator=torch.Generator().manual_seed(3)
    )
    # Brute force: k = floor(0.5 * 5) = 2, h floored at 1e-8, pi = min(1, k h / sum h) over the valid tokens.
    h = [max(v, 1e-8) for v in entropy[0, :5].tolist()]
    pi = [min(1.0, 2 * v / sum(h)) for v in h]
    assert not selected[:, 5].any()
    for t, probability in enumerate(pi):
        frequency = selected[:, t].double().mean().item()
        assert abs(frequency - probability) < 4 * math.sqrt(probability * (1 - probability) / rows) + 1e-3
        kept = weights[selected[:, t], t]
        assert torch.allclose(kept, torch.full_like(kept, 1 / probability))
    assert (weights[~selected] == 0).all()
    # Horvitz-Thompson: the weighted sum of a per-token quantity is unbiased for its full sum.
    # The zero-entropy token gets value 0: with pi ~ 1e-9 it is never drawn, its term would only add variance.
    values = torch.tensor([1.0, 0.0, -3.0, 0.5, 4.0, 100.0], dtype=torch.float64)
    estimate = (weights * values).sum(dim=1).mean().item()
    # 0.45 is about 4.5 standard errors; the unweighted sum would be off by 1.3.
    assert abs(estimate - values[:5].sum().item()) < 0.45


def test_importance_sample_batch_scope_and_empty_rows():
    entropy = torch.rand(3, 5, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    selected, weights = tip_importance_sample(entropy, mask, ratio=0.4, scope="batch")
    assert not selected[1].any() and (weights[1] == 0).all()
    # Every kept weight is 1/pi with pi computed over the whole batch.
    h = entropy[mask]
    pi = (math.floor(0.4 * 10) * entropy / h.sum()).clamp(max=1)
    assert torch.allclose(weights[selected], 1 / pi[selected])


# ---------------------------------------------------------------------------------------------------------
# tip_quadrants
# ---------------------------------------------------------------------------------------------------------


def test_tip_quadrants_matches_brute_force():
    entropy, divergence, mask = ragged_batch(4)
    cells = valid_cells(mask.tolist())
    h = [entropy[b, t].item() for b, t in cells]
    d = [divergence[b, t].item() for b, t in cells]
    h_median, d_median = float(np.median(h)), float(np.median(d))
    counts = {"q1": 0, "q2": 0, "q3": 0, "q4": 0}
    for hv, dv in zip(h, d):
        key = {(True, True): "q1", (True, False): "q2", (False, True): "q3", (False, False): "q4"}
        counts[key[(hv > h_median, dv > d_median)]] += 1
    got = tip_quadrants(entropy, divergence, mask)
    assert got == pytest.approx({key: value / len(cells) for key, value in counts.items()})
    assert sum(got.values()) == pytest.approx(1.0)
    empty = tip_quadrants(entropy, divergence, torch.zeros_like(mask))
    assert empty == {"q1": 0.0, "q2": 0.0, "q3": 0.0, "q4": 0.0}


# ---------------------------------------------------------------------------------------------------------
# position_weights
# ---------------------------------------------------------------------------------------------------------


def reference_position_weights(mask, w_min, tau, slope, direction):
    out = []
    for row in mask:
        length = max(sum(1 for m in row if m), 1)
        index, weights = 0, []
        for m in row:
            if not m:
                weights.append(0.0)
                continue
            index += 1
            u = (index - 0.5) / length
            if direction == "decreasing":
                u = 1 - u
            weights.append(w_min + (1 - w_min) / (1 + math.exp(-(u - tau) / slope)))
        out.append(weights)
    return out


def test_position_weights_quoted_moderate_schedule():
    # L = 5 puts u at 0.1, 0.3, 0.5, 0.7, 0.9; methods.md §4.1 quotes 0.339, 0.625, 0.911, 0.987.
    weights = position_weights(torch.ones(1, 5), dtype=torch.float64)[0].tolist()
    assert weights[:4] == pytest.approx([0.339, 0.625, 0.911, 0.987], abs=6e-4)
    assert 0.998 < weights[4] < 1.0
    # u -> 0 gives 0.286; mean over uniform u is 0.771.
    long_row = position_weights(torch.ones(1, 20000), dtype=torch.float64)
    assert long_row[0, 0].item() == pytest.approx(0.286, abs=1e-3)
    assert long_row.mean().item() == pytest.approx(0.771, abs=1e-3)


@pytest.mark.parametrize("direction", ["increasing", "decreasing"])
def test_position_weights_match_brute_force_with_padding(direction):
    _, _, mask = ragged_batch(0)
    for settings in [dict(), dict(w_min=0.1, tau=0.6, slope=0.25)]:
        got = position_weights(mask, direction=direction, dtype=torch.float64, **settings)
        full = dict(w_min=0.25, tau=0.30, slope=0.10) | settings
        expected = reference_position_weights(mask.tolist(), direction=direction, **full)
        assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert got.dtype == torch.float64 and not got.requires_grad


def test_position_weights_ignore_padding_location_and_mirror():
    left = torch.tensor([[0, 0, 1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 1, 1, 0, 0]])
    assert torch.equal(position_weights(left)[0, 2:], position_weights(right)[0, :4])
    increasing = position_weights(torch.ones(1, 7))
    assert torch.allclose(position_weights(torch.ones(1, 7), direction="decreasing"), increasing.flip(1))
    assert position_weights(torch.zeros(2, 3)).eq(0).all()


# ---------------------------------------------------------------------------------------------------------
# evidence_mask
# ---------------------------------------------------------------------------------------------------------


def test_evidence_mask_threshold_and_quantile_brute_force():
    generator = torch.Generator().manual_seed(9)
    teacher = -torch.rand(4, 10, generator=generator, dtype=torch.float64) * 4
    student = -torch.rand(4, 10, generator=generator, dtype=torch.float64) * 4
    _, _, mask = ragged_batch(0, rows=4, width=10)
    evidence = (teacher - student).tolist()
    cells = valid_cells(mask.tolist())
    for threshold in (0.0, 0.5, -1.0):
        expected = [[bool(mask[b, t]) and evidence[b][t] > threshold for t in range(10)] for b in range(4)]
        assert evidence_mask(teacher, student, mask, threshold=threshold).tolist() == expected
    for share in (0.2, 0.1, 1.0):
        cutoff = float(np.quantile([evidence[b][t] for b, t in cells], 1 - share))
        expected = [[bool(mask[b, t]) and evidence[b][t] >= cutoff for t in range(10)] for b in range(4)]
        got = evidence_mask(teacher, student, mask, mode="quantile", quantile=share)
        assert got.tolist() == expected
    # With distinct values, the top 20% of 20 valid tokens is exactly 4 tokens.
    assert evidence_mask(teacher, student, mask, mode="quantile", quantile=0.2).sum().item() == 4
    assert evidence_mask(teacher, student, torch.zeros_like(mask), mode="quantile").sum() == 0


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ratio=0.0), "ratio must be in"),
        (dict(ratio=1.5), "ratio must be in"),
        (dict(strategy="entropy"), "strategy='entropy' is not supported"),
        (dict(scope="row"), "scope='row' is not supported"),
        (dict(clip_quantile=0.0), "clip_quantile"),
        (dict(forward_divergence=torch.zeros(2, 2)), "forward_divergence has shape"),
    ],
)
def test_tip_mask_bad_arguments(kwargs, message):
    entropy, divergence, mask = ragged_batch(0)
    with pytest.raises(ValueError, match=message):
        tip_mask(entropy, divergence, mask, **kwargs)


def test_bad_tensors_raise_clear_errors():
    entropy, divergence, mask = ragged_batch(0)
    with pytest.raises(ValueError, match="divergence has shape"):
        tip_mask(entropy, divergence[:, :3], mask)
    with pytest.raises(ValueError, match="mask must be 2-D"):
        tip_mask(entropy, divergence, mask[0])
    broken = entropy.clone()
    broken[4, 4] = float("nan")
    with pytest.raises(ValueError, match="student_entropy has NaN"):
        tip_mask(broken, divergence, mask)
    with pytest.raises(ValueError, match="direction='up'"):
        position_weights(mask, direction="up")
    with pytest.raises(ValueError, match="slope must be > 0"):
        position_weights(mask, slope=0.0)
    with pytest.raises(ValueError, match="w_min must be in"):
        position_weights(mask, w_min=1.5)
    with pytest.raises(ValueError, match="mode='top' is not supported"):
        evidence_mask(entropy, divergence, mask, mode="top")
    with pytest.raises(ValueError, match="quantile must be in"):
        evidence_mask(entropy, divergence, mask, mode="quantile", quantile=0.0)
    with pytest.raises(ValueError, match="scope='all'"):
        tip_importance_sample(entropy, mask, scope="all")
