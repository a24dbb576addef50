"""RLAD / TRRD: trust-region ratio distillation inside GRPO (methods.md §10, arXiv 2602.22495).

Pure tensor functions; shapes ``[B, T]`` (or anything that broadcasts the same way), one entry per completion
token. Log-probabilities are those of the sampled tokens, all at GRPO's ``temperature``.

* :func:`trrd_log_ratio` — log r^TRRD = α (log π_θ − log π_old) + (1 − α) clamp(log π_θ − log π_T, −c, c)
  (Eq. 3), with the two clamp readings of §10.4 item 2.
* :func:`trrd_anchor_logp` — the detached anchor a with log π_θ − a = log r^TRRD, so that GRPO's own loss
  (``old_per_token_logps := a``) computes TRRD for every ``loss_type`` (§10.4 item 2, ``trl.md`` §5.4).
* :func:`trrd_logp_grad_scale` and :func:`scale_gradient` — the per-token gradient factor on log π_θ that turns
  the anchor route into the ``"literal"`` clamp (same values, gradient α ∇log π_θ on clamped tokens).
* :func:`teacher_clamp_mask` — which tokens the teacher clamp is active on (to log the clamp rate).
* :func:`policy_loss_per_token` — GRPO's per-token surrogate for a given log-ratio (asymmetric clip,
  ``delta``, CISPO, SAPO) with the clip indicators GRPO logs, for a custom per-token ratio path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

TEACHER_CLAMP_MODES = ("straight_through", "literal")
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
POLICY_LOSS_TYPES = CLIPPED_LOSS_TYPES + ("cispo", "sapo")


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"alpha={alpha} must lie in [0, 1] (1 = plain GRPO, 0 = ratio against the teacher only)."
        )


def _check_teacher_clamp(teacher_clamp: float) -> None:
    if not teacher_clamp > 0:
        raise ValueError(
            f"teacher_clamp={teacher_clamp} must be > 0: it bounds |log π_θ − log π_T| (the paper uses 1.0; "
            "math.inf disables the clamp)."
        )


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"Per-token log-probs must share one shape; got {shapes}.")


def trrd_log_ratio(
    logp: Tensor,
    old_logp: Tensor,
    teacher_logp: Tensor,
    *,
    alpha: float = 0.5,
    teacher_clamp: float = 1.0,
    teacher_clamp_mode: str = "straight_through",
) -> Tensor:
    """Log of the TRRD ratio r = π_θ / (π_old^α · π_T^(1−α)) with the teacher term clamped (Eq. 3).

    log r = α (logp − old_logp) + (1 − α) · clamp(logp − teacher_logp, −c, c),   c = ``teacher_clamp``

    Args:
        logp: ``[B, T]`` log π_θ of the sampled tokens (differentiable).
        old_logp: ``[B, T]`` log π_old (behaviour policy); treated as a constant.
        teacher_logp: ``[B, T]`` log π_T; treated as a constant.
        alpha: weight of the old policy in the geometric mixture, in [0, 1]. α = 1 is plain GRPO: the result
            is then exactly ``logp − old_logp`` (same value and gradient; the teacher is ignored).
        teacher_clamp: c > 0; ``math.inf`` disables the clamp.
        teacher_clamp_mode: where the clamp acts (the paper does not say, §10.4 item 2):
            ``"straight_through"`` (default) clamps the value of sg(logp) − teacher_logp and adds
            logp − sg(logp), so the value is as above and ∇ log r = ∇ logp on every token, exactly as Eq. 3
            without the clamp; ``"literal"`` clamps logp − teacher_logp itself, as App. B writes it, so outside
            [−c, c] the teacher term passes no gradient and ∇ log r = α ∇ logp there. Both have the same value.

    Returns:
        ``[B, T]`` log r^TRRD (exponentiate for GRPO's ``coef_1``).
    """
    _check_alpha(alpha)
    _check_teacher_clamp(teacher_clamp)
    if teacher_clamp_mode not in TEACHER_CLAMP_MODES:
        raise ValueError(
            f"Unknown teacher_clamp_mode={teacher_clamp_mode!r}; choose one of {TEACHER_CLAMP_MODES}."
        )
    _check_same_shape(logp=logp, old_logp=old_logp, teacher_logp=teacher_logp)
    old_logp, teacher_logp = old_logp.detach(), teacher_logp.detach()
    if alpha == 1.0:
        return logp - old_logp  # GRPO's log-ratio, bit for bit
    if teacher_clamp_mode == "literal":
        teacher_term = (logp - teacher_logp).clamp(-teacher_clamp, teacher_clamp)
    else:
        frozen = logp.detach()
        teacher_term = (logp - frozen) + (frozen - teacher_logp).clamp(-teacher_clamp, teacher_clamp)
    return alpha * (logp - old_logp) + (1.0 - alpha) * teacher_term


def trrd_anchor_logp(
    old_logp: Tensor,
    teacher_logp: Tensor,
    *,
    alpha: float = 0.5,
    teacher_clamp: float = 1.0,
) -> Tensor:
    """Detached anchor a with ``logp − a`` = the straight-through TRRD log-ratio, for GRPO's own loss.

    a = α · old + (1 − α) · (old − clamp(old − teacher, −c, c))

    Replace GRPO's ``old_per_token_logps`` by ``a`` and GRPO's ``log_ratio = logp − a`` equals
    ``trrd_log_ratio(logp, old, teacher, teacher_clamp_mode="straight_through")`` in value and gradient
    whenever logp = old in value — one update per generation batch (``num_iterations=1``,
    ``steps_per_generation == gradient_accumulation_steps``). Otherwise the clamp is evaluated at the
    behaviour policy instead of the current one (§10.4 item 4). α = 1 returns ``old_logp`` unchanged.
    Shapes ``[B, T]``.
    """
    _check_alpha(alpha)
    _check_teacher_clamp(teacher_clamp)
    _check_same_shape(old_logp=old_logp, teacher_logp=teacher_logp)
    old_logp, teacher_logp = old_logp.detach(), teacher_logp.detach()
    if alpha == 1.0:
        return old_logp
    clamped_gap = (old_logp - teacher_logp).clamp(-teacher_clamp, teacher_clamp)
    return alpha * old_logp + (1.0 - alpha) * (old_logp - clamped_gap)


def trrd_logp_grad_scale(
    old_logp: Tensor,
    teacher_logp: Tensor,
    *,
    alpha: float = 0.5,
    teacher_clamp: float = 1.0,
) -> Tensor:
    """``[B, T]`` factor s on ∇ log π_θ that makes the anchor route the ``"literal"`` clamp: α where the clamp is
    active (|old_logp − teacher_logp| > c), 1 elsewhere.

    With a = :func:`trrd_anchor_logp` and logp' = :func:`scale_gradient` (logp, s), ``logp' − a`` equals
    ``trrd_log_ratio(logp, old, teacher, teacher_clamp_mode="literal")`` in value and gradient whenever logp = old
    in value (the same condition as the anchor route itself; otherwise the clamp is evaluated at the behaviour
    policy, §10.4 item 4). Detached.
    """
    _check_alpha(alpha)
    clamped = teacher_clamp_mask(old_logp, teacher_logp, teacher_clamp=teacher_clamp)
    return torch.where(clamped, alpha, 1.0).to(old_logp.dtype)


def scale_gradient(logp: Tensor, scale: Tensor) -> Tensor:
    """logp + (s − 1)·(logp − sg(logp)): the value of ``logp``, the gradient s·∇logp, token by token.

    ``scale`` (detached, broadcastable to ``logp``) of all ones returns ``logp`` itself.
    """
    scale = scale.detach().to(logp.dtype)
    if bool((scale == 1).all()):
        return logp
    return logp + (scale - 1) * (logp - logp.detach())


def teacher_clamp_mask(logp: Tensor, teacher_logp: Tensor, *, teacher_clamp: float = 1.0) -> Tensor:
    """``[B, T]`` bool: tokens with |logp − teacher_logp| > ``teacher_clamp`` (log their rate)."""
    _check_teacher_clamp(teacher_clamp)
    _check_same_shape(logp=logp, teacher_logp=teacher_logp)
    return (logp.detach() - teacher_logp.detach()).abs() > teacher_clamp


class PolicyLoss(NamedTuple):
    """Output of :func:`policy_loss_per_token`.

    per_token_loss: ``[B, T]`` (or ``[B, 1]`` for sequence-level ratios) loss before masking / aggregation.
    low_clipped, high_clipped: bool, GRPO's clip indicators (``clip_ratio/low_mean``, ``high_mean``; for CISPO
        ``high_clipped`` is GRPO's ``cispo_clip_ratio``); all False for SAPO, which does not clip.
    """

    per_token_loss: Tensor
    low_clipped: Tensor
    high_clipped: Tensor

    @property
    def region_clipped(self) -> Tensor:
        return self.low_clipped | self.high_clipped


def policy_loss_per_token(
    log_ratio: Tensor,
    advantages: Tensor,
    *,
    loss_type: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    logp: Tensor | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
) -> PolicyLoss:
    """GRPO's per-token policy loss for an arbitrary log-ratio (e.g. :func:`trrd_log_ratio`).

    With ratio ρ = exp(log_ratio) and advantage A (``[B]`` or ``[B, T]``, broadcast over tokens), as
    TRL 1.16's ``GRPOTrainer._compute_loss`` builds it:

    * ``grpo | bnpo | dr_grpo | dapo | luspo``: −min(ρ' A, clamp(ρ, 1 − ε_low, 1 + ε_high) A), where
      ρ' = ρ, or min(ρ, δ) with ``delta`` (two-sided clipping); these types differ only in aggregation,
      which stays with the trainer (it depends on gradient accumulation and the token count of the
      generation batch).
    * ``cispo``: −sg(min(ρ, ε_high)) · A · logp (``epsilon_high`` is the ratio cap itself here, as in TRL).
    * ``sapo``: −σ(τ (ρ − 1)) · 4/τ · A with τ = ``sapo_temperature_pos`` for A > 0, else ``..._neg``.

    Clip indicators: low = ρ' < 1 − ε_low and A < 0; high = ρ' > 1 + ε_high and A > 0 (CISPO: ρ > ε_high and
    A > 0). ``epsilon_high=None`` means ``epsilon_low`` (TRL's default). ``logp`` (the differentiable log π_θ)
    is required for ``cispo`` only. ``vespo`` needs GRPO's trainer-side gamma weights and is not offered here:
    use the anchor route (:func:`trrd_anchor_logp`), which runs GRPO's own loss for every ``loss_type``.
    """
    if loss_type not in POLICY_LOSS_TYPES:
        raise ValueError(
            f"Unknown loss_type={loss_type!r}; choose one of {POLICY_LOSS_TYPES} (for 'vespo' use the "
            "anchor route, trrd_anchor_logp, with GRPO's own loss)."
        )
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    if not (epsilon_low >= 0 and epsilon_high >= 0):
        raise ValueError(f"epsilon_low={epsilon_low} and epsilon_high={epsilon_high} must be ≥ 0.")
    advantages = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(log_ratio)
    never = torch.zeros_like(ratio * advantages, dtype=torch.bool)

    if loss_type == "cispo":
        if logp is None:
            raise ValueError("loss_type='cispo' needs logp (the differentiable per-token log π_θ).")
        loss = -torch.clamp(ratio, max=epsilon_high).detach() * advantages * logp
        return PolicyLoss(loss, never, (ratio > epsilon_high) & (advantages > 0))
    if loss_type == "sapo":
        temperature = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        loss = -torch.sigmoid(temperature * (ratio - 1)) * 4 / temperature * advantages
        return PolicyLoss(loss, never, never)

    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return PolicyLoss(loss, low, high)


__all__ = [
    "POLICY_LOSS_TYPES",
    "TEACHER_CLAMP_MODES",
    "PolicyLoss",
    "policy_loss_per_token",
    "teacher_clamp_mask",
    "scale_gradient",
    "trrd_anchor_logp",
    "trrd_log_ratio",
    "trrd_logp_grad_scale",
]
