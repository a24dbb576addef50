"""TRRD ratio and the GRPO surrogate helpers (methods.md §10), against brute force and TRL's GRPO loss."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer

from trl_opd.rlad import (
    policy_loss_per_token,
    scale_gradient,
    teacher_clamp_mask,
    trrd_anchor_logp,
    trrd_log_ratio,
    trrd_logp_grad_scale,
)


def random_logps(shape=(3, 5), seed=0, spread=2.0):
    generator = torch.Generator().manual_seed(seed)
    logp, old, teacher = (
        -spread * torch.rand(shape, generator=generator, dtype=torch.float64) for _ in range(3)
    )
    return logp.requires_grad_(), old, teacher


def brute_force_trrd(logp, old, teacher, alpha, clamp, mode):
    """Eq. 3 element by element; returns values and d(value)/d(logp), from the textbook formula."""
    values, grads = [], []
    for lp, o, t in zip(logp.flatten().tolist(), old.flatten().tolist(), teacher.flatten().tolist()):
        gap = lp - t
        values.append(alpha * (lp - o) + (1 - alpha) * max(-clamp, min(clamp, gap)))
        inside = abs(gap) < clamp
        grads.append(1.0 if mode == "straight_through" or inside else alpha)
    return torch.tensor(values, dtype=torch.float64).view(logp.shape), torch.tensor(grads).view(logp.shape)


@pytest.mark.parametrize("mode", ["straight_through", "literal"])
@pytest.mark.parametrize("alpha,clamp", [(0.5, 1.0), (0.0, 0.3), (0.8, 2.5), (0.3, math.inf)])
def test_trrd_log_ratio_matches_brute_force(mode, alpha, clamp):
    logp, old, teacher = random_logps()
    result = trrd_log_ratio(logp, old, teacher, alpha=alpha, teacher_clamp=clamp, teacher_clamp_mode=mode)
    expected, expected_grad = brute_force_trrd(logp, old, teacher, alpha, clamp, mode)
    torch.testing.assert_close(result, expected)
    (grad,) = torch.autograd.grad(result.sum(), logp)
    torch.testing.assert_close(grad, expected_grad.double())
    if mode == "literal" and clamp < 1 and alpha < 1:
        assert (grad == alpha).any() and (grad == 1).any()  # both regimes are exercised


def test_alpha_one_is_exactly_grpo_ratio():
    logp, old, teacher = random_logps(seed=1)
    for mode in ("straight_through", "literal"):
        result = trrd_log_ratio(logp, old, teacher, alpha=1.0, teacher_clamp_mode=mode)
        assert torch.equal(result, logp - old)
        assert torch.equal(torch.autograd.grad(result.sum(), logp)[0], torch.ones_like(logp))
    assert torch.equal(trrd_anchor_logp(old, teacher, alpha=1.0), old)


def test_teacher_equal_to_old_reproduces_grpo_inside_the_clamp():
    logp, old, _ = random_logps(seed=2)
    near = (old + 0.5 * (logp.detach() - old).clamp(-1, 1)).requires_grad_()  # |near − old| ≤ 0.5 < c
    for alpha in (0.0, 0.3, 0.7):
        result = trrd_log_ratio(near, old, old, alpha=alpha)
        torch.testing.assert_close(result, near - old)


def test_anchor_route_equals_straight_through_in_value_and_gradient():
    _, old, teacher = random_logps(seed=3, spread=4.0)
    logp = old.clone().requires_grad_()  # one update per generation batch: logp = old in value
    for alpha, clamp in ((0.5, 1.0), (0.2, 0.5), (0.0, 2.0)):
        anchor = trrd_anchor_logp(old, teacher, alpha=alpha, teacher_clamp=clamp)
        direct = trrd_log_ratio(logp, old, teacher, alpha=alpha, teacher_clamp=clamp)
        torch.testing.assert_close(logp - anchor, direct)
        grad_anchor = torch.autograd.grad((logp - anchor).pow(2).sum() + (logp - anchor).sum(), logp)[0]
        grad_direct = torch.autograd.grad(direct.pow(2).sum() + direct.sum(), logp)[0]
        torch.testing.assert_close(grad_anchor, grad_direct)
        assert not anchor.requires_grad


def test_scaled_anchor_route_equals_the_literal_clamp_in_value_and_gradient():
    """Anchor + per-token gradient factor s (α on clamped tokens) is App. B's literal clamp, against the textbook
    formula in float64 — and differs from the straight-through gradient where the clamp is active."""
    _, old, teacher = random_logps(seed=5, spread=4.0)
    logp = old.clone().requires_grad_()  # one update per generation batch: logp = old in value
    for alpha, clamp in ((0.5, 1.0), (0.2, 0.5), (0.0, 2.0), (0.7, math.inf)):
        anchor = trrd_anchor_logp(old, teacher, alpha=alpha, teacher_clamp=clamp)
        scale = trrd_logp_grad_scale(old, teacher, alpha=alpha, teacher_clamp=clamp)
        routed = scale_gradient(logp, scale) - anchor
        expected, expected_grad = brute_force_trrd(logp, old, teacher, alpha, clamp, "literal")
        torch.testing.assert_close(routed, expected)
        (grad,) = torch.autograd.grad(routed.sum(), logp)
        torch.testing.assert_close(grad, expected_grad.double())
        clamped = (old - teacher).abs() > clamp
        assert torch.equal(scale, torch.where(clamped, alpha, 1.0).double()) and not scale.requires_grad
        if math.isfinite(clamp):
            assert clamped.any() and (~clamped).any()  # both regimes are exercised


def test_scale_gradient_keeps_the_value():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([[0.3, 1.0, 0.0]], dtype=torch.float64)
    scaled = scale_gradient(logp, scale)
    assert torch.equal(scaled, logp)
    (grad,) = torch.autograd.grad((scaled * torch.tensor([[2.0, 3.0, 5.0]])).sum(), logp)
    torch.testing.assert_close(grad, torch.tensor([[0.6, 3.0, 0.0]], dtype=torch.float64))
    assert scale_gradient(logp, torch.ones_like(scale)) is logp


def test_teacher_clamp_mask():
    logp = torch.tensor([[-1.0, -0.2, -3.0]])
    teacher = torch.tensor([[-2.5, -0.1, -1.5]])
    assert teacher_clamp_mask(logp, teacher).tolist() == [[True, False, True]]
    assert teacher_clamp_mask(logp, teacher, teacher_clamp=1.6).tolist() == [[False, False, False]]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"alpha": 1.5}, r"alpha=1.5 must lie in \[0, 1\]"),
        ({"alpha": -0.1}, "alpha"),
        ({"teacher_clamp": 0.0}, "teacher_clamp=0.0 must be > 0"),
        ({"teacher_clamp": -1.0}, "teacher_clamp"),
        ({"teacher_clamp_mode": "soft"}, "teacher_clamp_mode"),
    ],
)
def test_trrd_rejects_bad_options(kwargs, match):
    logp, old, teacher = random_logps()
    with pytest.raises(ValueError, match=match):
        trrd_log_ratio(logp, old, teacher, **kwargs)


def test_trrd_rejects_mismatched_shapes():
    logp, old, teacher = random_logps()
    with pytest.raises(ValueError, match="share one shape"):
        trrd_log_ratio(logp, old[:, :2], teacher)
    with pytest.raises(ValueError, match="alpha"):
        trrd_anchor_logp(old, teacher, alpha=2.0)


# ------------------------------------------------------------------------------------------- surrogate loss


def brute_force_clipped(log_ratio, advantages, eps_low, eps_high, delta):
    losses, lows, highs = [], [], []
    for row, adv in zip(log_ratio.tolist(), advantages.tolist()):
        for value in row:
            ratio = math.exp(value)
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            capped = ratio if delta is None else min(ratio, delta)
            losses.append(-min(capped * adv, clipped * adv))
            lows.append(capped < 1 - eps_low and adv < 0)
            highs.append(capped > 1 + eps_high and adv > 0)
    shape = log_ratio.shape
    return (
        torch.tensor(losses, dtype=torch.float64).view(shape),
        torch.tensor(lows).view(shape),
        torch.tensor(highs).view(shape),
    )


@pytest.mark.parametrize("delta", [None, 1.5])
def test_clipped_surrogate_matches_brute_force(delta):
    log_ratio = torch.linspace(-0.6, 0.6, 5, dtype=torch.float64).repeat(3, 1)
    advantages = torch.tensor([1.3, -0.7, 0.0], dtype=torch.float64)
    out = policy_loss_per_token(
        log_ratio, advantages, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28, delta=delta
    )
    loss, low, high = brute_force_clipped(log_ratio, advantages, 0.2, 0.28, delta)
    torch.testing.assert_close(out.per_token_loss, loss)
    assert torch.equal(out.low_clipped, low) and torch.equal(out.high_clipped, high)
    assert low.any() and high.any()
    assert torch.equal(out.region_clipped, low | high)


def test_cispo_and_sapo_match_their_formulas():
    log_ratio = torch.tensor([[-0.5, 0.1, 0.9]], dtype=torch.float64, requires_grad=True)
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    cispo = policy_loss_per_token(log_ratio, advantages, loss_type="cispo", epsilon_high=1.5, logp=logp)
    expected = [
        -min(math.exp(r), 1.5) * a * lp
        for r, a, lp in zip(*(t[0].tolist() for t in (log_ratio, advantages, logp)))
    ]
    torch.testing.assert_close(cispo.per_token_loss, torch.tensor([expected], dtype=torch.float64))
    assert cispo.high_clipped.tolist() == [[False, False, True]]
    assert (
        torch.autograd.grad(cispo.per_token_loss.sum(), log_ratio, allow_unused=True)[0] is None
    )  # ratio detached

    sapo = policy_loss_per_token(log_ratio, advantages, loss_type="sapo")
    expected = []
    for r, a in zip(log_ratio[0].tolist(), advantages[0].tolist()):
        tau = 1.0 if a > 0 else 1.05
        expected.append(-4 / tau / (1 + math.exp(-tau * (math.exp(r) - 1))) * a)
    torch.testing.assert_close(sapo.per_token_loss, torch.tensor([expected], dtype=torch.float64))
    assert not sapo.region_clipped.any()
    with pytest.raises(ValueError, match="needs logp"):
        policy_loss_per_token(log_ratio, advantages, loss_type="cispo")
    with pytest.raises(ValueError, match="vespo"):
        policy_loss_per_token(log_ratio, advantages, loss_type="vespo")


def test_zero_advantage_gives_zero_gradient():
    logp, old, teacher = random_logps(seed=4)
    for mode in ("straight_through", "literal"):
        log_ratio = trrd_log_ratio(logp, old, teacher, teacher_clamp_mode=mode)
        out = policy_loss_per_token(log_ratio, torch.zeros(3, dtype=torch.float64), epsilon_high=0.28)
        (grad,) = torch.autograd.grad(out.per_token_loss.sum(), logp)
        assert torch.equal(grad, torch.zeros_like(grad))


# ------------------------------------------------------------------------------------------- against TRL GRPO


def fake_grpo(loss_type, per_token_logps, eps_low=0.2, eps_high=0.28):
    """The attributes GRPOTrainer._compute_loss reads, with a model that returns the given log-probs."""
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (
            per_token_logps,
            torch.zeros_like(per_token_logps),
            None,
        ),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=0.0,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        args=SimpleNamespace(
            delta=None, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, steps_per_generation=1
        ),
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        max_completion_length=5,
        _metrics={"train": defaultdict(list)},
        accelerator=SimpleNamespace(reduce=lambda x, reduction: x, gather=lambda x: x, num_processes=1),
    )


def grpo_inputs(old, advantages, mask):
    batch, length = mask.shape
    return {
        "prompt_ids": torch.zeros(batch, 2, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 2),
        "completion_ids": torch.zeros(batch, length, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum(),
    }


def aggregate(per_token_loss, mask, loss_type):
    if loss_type in ("grpo", "sapo"):
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    return (per_token_loss * mask).sum() / mask.sum()  # dapo / cispo with one process and no accumulation


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
def test_alpha_one_reproduces_trl_grpo_loss_gradient_and_clip_metrics(loss_type):
    logp, old, teacher = random_logps(seed=5, spread=1.0)
    old = logp.detach() + 0.4 * torch.randn(
        logp.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64
    )
    advantages = torch.tensor([1.0, -0.5, 0.8], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float64)
    eps_high = 1.3 if loss_type == "cispo" else 0.28

    trainer = fake_grpo(loss_type, logp, eps_high=eps_high)
    grpo_loss = GRPOTrainer._compute_loss(trainer, None, grpo_inputs(old, advantages, mask))
    grpo_grad = torch.autograd.grad(grpo_loss, logp)[0]

    log_ratio = trrd_log_ratio(logp, old, teacher, alpha=1.0)
    ours = policy_loss_per_token(
        log_ratio, advantages, loss_type=loss_type, epsilon_low=0.2, epsilon_high=eps_high, logp=logp
    )
    our_loss = aggregate(ours.per_token_loss, mask, loss_type)
    assert torch.equal(our_loss, grpo_loss)
    assert torch.equal(torch.autograd.grad(our_loss, logp)[0], grpo_grad)

    metrics = trainer._metrics["train"]

    def masked_mean(flags):
        return ((flags.double() * mask).sum() / mask.sum()).item()

    if loss_type in ("grpo", "dapo"):
        assert metrics["clip_ratio/low_mean"] == [masked_mean(ours.low_clipped)]
        assert metrics["clip_ratio/high_mean"] == [masked_mean(ours.high_clipped)]
        assert metrics["clip_ratio/region_mean"] == [masked_mean(ours.region_clipped)]
        assert ours.region_clipped.any()
    if loss_type == "cispo":
        assert metrics["cispo_clip_ratio"] == [masked_mean(ours.high_clipped)]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "sapo"])
def test_anchor_route_through_trl_grpo_equals_the_custom_straight_through_path(loss_type):
    _, old, teacher = random_logps(seed=6, spread=3.0)
    logp = old.clone().requires_grad_()
    advantages = torch.tensor([[1.0, -1.0, 0.5, 0.5, -2.0]] * 3, dtype=torch.float64)  # per-token advantages
    mask = torch.ones(3, 5, dtype=torch.float64)

    anchor = trrd_anchor_logp(old, teacher, alpha=0.5)
    grpo_loss = GRPOTrainer._compute_loss(
        fake_grpo(loss_type, logp), None, grpo_inputs(anchor, advantages, mask)
    )
    log_ratio = trrd_log_ratio(logp, old, teacher, alpha=0.5)
    ours = aggregate(
        policy_loss_per_token(log_ratio, advantages, loss_type=loss_type, epsilon_high=0.28).per_token_loss,
        mask,
        loss_type,
    )
    torch.testing.assert_close(ours, grpo_loss)
    torch.testing.assert_close(torch.autograd.grad(ours, logp)[0], torch.autograd.grad(grpo_loss, logp)[0])
    assert (log_ratio.detach().abs() > 0.05).any()  # the teacher actually moved the ratio away from 1
