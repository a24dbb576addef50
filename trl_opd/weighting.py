"""Token selection and token weights: pure tensor functions.

* TIP token selection (methods.md §3, arXiv 2604.14084): :func:`tip_mask`, :func:`tip_importance_sample`,
  :func:`tip_quadrants`.
* PW-OPSD position weights (methods.md §4, arXiv 2605.21606): :func:`position_weights`.
* EDGE-OPD evidence mask (methods.md §5.2, a trl_opd design): :func:`evidence_mask`.

Conventions: B rows, T positions. ``mask`` is [B, T] and marks the supervised completion tokens (any
non-zero value counts as valid; padding may sit anywhere in a row). Every output is detached: weights and
selections never carry gradient (methods.md §0.2). Statistics that the methods define "over the batch"
(the TIP entropy clip and min-max, the evidence quantile) are taken over the valid tokens of the tensors
passed in, i.e. over one micro-batch on one rank.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TIP_STRATEGIES = ("soft_or", "entropy_sample", "q3", "divergence_only")
TIP_SCOPES = ("sequence", "batch")
POSITION_DIRECTIONS = ("increasing", "decreasing")
EVIDENCE_MODES = ("threshold", "quantile")

# Sampling weight of a token with zero entropy (methods.md §3.4 item 3): tiny but positive, so that a row
# whose entropies are all zero can still be sampled.
ENTROPY_SAMPLE_FLOOR = 1e-8
# ρ·L is floored with this slack so that e.g. 0.29 · 100 keeps 29 tokens, not 28 (binary rounding).
_BUDGET_SLACK = 1e-9


# --------------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------------


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; use one of {', '.join(map(repr, choices))}.")


def _check_unit_interval(name: str, value: float, meaning: str) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1] ({meaning}), got {value!r}.")


def _valid_positions(mask: Tensor, **per_token: Tensor | None) -> Tensor:
    """Check that ``mask`` is [B, T] and every tensor in ``per_token`` has its shape; return mask != 0."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D [B, T], got shape {tuple(mask.shape)}.")
    for name, tensor in per_token.items():
        if tensor is not None and tensor.shape != mask.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but mask has shape {tuple(mask.shape)}; "
                f"pass one value per token ([B, T], the same layout as mask)."
            )
    return mask != 0


def _float_at_valid(name: str, values: Tensor, valid: Tensor) -> Tensor:
    """Detached floating copy (at least fp32) of ``values`` with zeros at invalid positions.

    Padding may hold anything (even NaN); valid positions must be finite.
    """
    values = values.detach()
    values = values.to(torch.promote_types(values.dtype, torch.float32))
    if not torch.isfinite(values[valid]).all():
        raise ValueError(f"{name} has NaN or infinite values at valid (mask != 0) positions.")
    return values.masked_fill(~valid, 0.0)


# --------------------------------------------------------------------------------------------------------
# TIP
# --------------------------------------------------------------------------------------------------------


def _selection_budget(lengths: Tensor, ratio: float) -> Tensor:
    """k = max(1, ⌊ρ·L⌋) for L ≥ 1 and 0 for L = 0 (methods.md §3.4 item 1, §3.5 item 2)."""
    kept = torch.floor(lengths.to(torch.float64) * ratio + _BUDGET_SLACK).long()
    return torch.where(lengths > 0, kept.clamp_min(1), torch.zeros_like(kept))


def _keep_top_k_per_row(scores: Tensor, valid: Tensor, k_per_row: Tensor) -> Tensor:
    """Keep the k_b highest-scoring valid positions of each row b; ties go to the earlier position."""
    scores = scores.masked_fill(~valid, -math.inf)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return (rank < k_per_row.unsqueeze(1)) & valid


def _keep_top_budget(scores: Tensor, valid: Tensor, ratio: float, scope: str) -> Tensor:
    if scope == "batch":
        flat_valid = valid.reshape(1, -1)
        budget = _selection_budget(flat_valid.sum(dim=1), ratio)
        return _keep_top_k_per_row(scores.reshape(1, -1), flat_valid, budget).reshape(valid.shape)
    return _keep_top_k_per_row(scores, valid, _selection_budget(valid.sum(dim=1), ratio))


def _min_max(values: Tensor, valid: Tensor, eps: float) -> Tensor:
    """Min-max to [0, 1] with statistics over valid positions; a range below eps is treated as eps."""
    low, high = values[valid].min(), values[valid].max()
    return ((values - low) / (high - low).clamp_min(eps)).masked_fill(~valid, 0.0)


def _normalised_entropy(entropy: Tensor, valid: Tensor, clip_quantile: float, eps: float) -> Tensor:
    """ĥ of TIP Eq. 7: entropy capped at its clip_quantile over valid tokens, then min-max normalised.

    The quantile interpolates linearly between order statistics (``torch.quantile``, numpy's default).
    """
    cap = torch.quantile(entropy[valid], clip_quantile)
    return _min_max(torch.minimum(entropy, cap), valid, eps)


def _gumbel_keys(weights: Tensor, generator: torch.Generator | None) -> Tensor:
    """Keys log w + Gumbel noise: the top k keys are k draws without replacement with probability ∝ w.

    (Efraimidis–Spirakis / Gumbel-top-k: the same distribution as successive ``torch.multinomial`` draws
    without replacement, but one vectorised call for every row.) The noise is drawn for all positions of
    ``weights`` in fp64, so a given generator state always yields the same keys.
    """
    uniform = torch.rand(weights.shape, generator=generator, device=weights.device, dtype=torch.float64)
    uniform = uniform.clamp_min(torch.finfo(torch.float64).tiny)
    return weights.to(torch.float64).log() - torch.log(-torch.log(uniform))


def _tip_scores(strategy, entropy, divergence, valid, *, clip_quantile, eps, generator) -> Tensor:
    if strategy == "soft_or":
        entropy_hat = _normalised_entropy(entropy, valid, clip_quantile, eps)
        divergence_hat = _min_max(divergence, valid, eps)
        return entropy_hat + divergence_hat - entropy_hat * divergence_hat
    if strategy == "q3":
        # Confident (low ĥ) tokens with a large forward KL; δ is not normalised (TIP §7.3).
        return divergence * (1.0 - _normalised_entropy(entropy, valid, clip_quantile, eps))
    if strategy == "divergence_only":
        return divergence
    return _gumbel_keys(entropy.clamp_min(ENTROPY_SAMPLE_FLOOR), generator)


@torch.no_grad()
def tip_mask(
    student_entropy: Tensor,
    divergence: Tensor,
    mask: Tensor,
    *,
    ratio: float = 0.5,
    strategy: str = "soft_or",
    scope: str = "sequence",
    generator: torch.Generator | None = None,
    forward_divergence: Tensor | None = None,
    clip_quantile: float = 0.98,
    eps: float = 1e-8,
) -> Tensor:
    """TIP token selection (methods.md §3): which positions receive the distillation loss.

    Args:
        student_entropy: [B, T] student entropy H(p_S,t) at the distillation temperature (any constant
            scale, e.g. division by log|V|, changes nothing here).
        divergence: [B, T] per-token divergence δ_t; the reverse KL of the loss for ``soft_or`` and
            ``divergence_only``. For ``q3`` pass the **forward** KL here (methods.md §3.4 item 4) or in
            ``forward_divergence``.
        mask: [B, T] supervised tokens (non-zero = valid).
        ratio: retention ratio ρ ∈ (0, 1].
        strategy:
            ``"soft_or"`` (TIP Eq. 7): s = ĥ + δ̂ − ĥ·δ̂, where ĥ is the entropy capped at its
            ``clip_quantile`` over the valid tokens of the micro-batch then min-max normalised, and δ̂ the
            min-max normalised divergence; keep the top-scoring tokens.
            ``"entropy_sample"``: sample without replacement with probability ∝ max(h, 1e-8), using
            ``generator`` (seed it identically on every rank, e.g. from (seed, step)).
            ``"q3"``: s = δ_fwd · (1 − ĥ) (overconfident tokens the teacher disagrees with).
            ``"divergence_only"``: s = δ.
        scope: ``"sequence"`` keeps k_b = max(1, ⌊ρ·L_b⌋) tokens in each row (L_b = valid tokens of
            row b); ``"batch"`` keeps max(1, ⌊ρ·Σ_b L_b⌋) over the flattened micro-batch. Rows (or a batch)
            without valid tokens keep nothing.
        generator: ``torch.Generator`` on the tensors' device, used by ``entropy_sample`` only
            (None: the global RNG, which ranks do not share).
        forward_divergence: optional [B, T] forward KL used as δ_fwd by ``q3`` instead of ``divergence``.
        clip_quantile: quantile q of the entropy cap (TIP: the top 2% are clipped, q = 0.98).
        eps: guard for a min-max range of ~0 (all values equal → all normalised values 0).

    Returns:
        BoolTensor [B, T], True at the selected positions; always a subset of ``mask``.

    Decisions (the paper is silent): ties are broken toward the earlier position; ρ·L is floored with a
    1e-9 slack against binary rounding (0.29 · 100 keeps 29); the 98th percentile interpolates linearly
    (``torch.quantile``); ``q3`` multiplies the raw, un-normalised δ_fwd (as TIP §7.3 writes it);
    ``entropy_sample`` draws by Gumbel-top-k, which has the distribution of successive draws without
    replacement; ``forward_divergence`` is ignored by the other strategies; NaN or ±inf at a valid position
    raises a ValueError (padding may hold anything). The selection runs under ``no_grad``.
    """
    _check_choice("strategy", strategy, TIP_STRATEGIES)
    _check_choice("scope", scope, TIP_SCOPES)
    _check_unit_interval("ratio", ratio, "the fraction of supervised tokens kept")
    _check_unit_interval("clip_quantile", clip_quantile, "the entropy quantile at which entropies are capped")
    valid = _valid_positions(
        mask, student_entropy=student_entropy, divergence=divergence, forward_divergence=forward_divergence
    )
    if strategy == "q3" and forward_divergence is not None:
        divergence = forward_divergence
    if not valid.any():
        return torch.zeros_like(valid)
    entropy = _float_at_valid("student_entropy", student_entropy, valid)
    divergence = _float_at_valid("divergence", divergence, valid)
    scores = _tip_scores(
        strategy, entropy, divergence, valid, clip_quantile=clip_quantile, eps=eps, generator=generator
    )
    return _keep_top_budget(scores, valid, ratio, scope)


@torch.no_grad()
def tip_importance_sample(
    student_entropy: Tensor,
    mask: Tensor,
    *,
    ratio: float = 0.5,
    scope: str = "sequence",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Entropy sampling with importance weights (methods.md §3.4 item 3, ``importance_weighting=True``).

    Poisson sampling: each valid token is kept independently with inclusion probability
    π_t = min(1, k·h_t / Σ h), where h_t = max(entropy, 1e-8), k is the budget of :func:`tip_mask`
    (max(1, ⌊ρ·L_b⌋) per row for ``scope="sequence"``, max(1, ⌊ρ·Σ L⌋) for ``"batch"``) and Σ h runs over
    the same tokens. Σ_{t kept} x_t / π_t is then an unbiased (Horvitz–Thompson) estimate of Σ_t x_t; use
    the weights with a normaliser that counts ``mask``, not the kept tokens, to keep that property.
    The number of kept tokens is random (k in expectation when no π_t is capped at 1) and may be 0.

    Args:
        student_entropy: [B, T] student entropy. mask: [B, T] (non-zero = valid).
        ratio: ρ ∈ (0, 1]. scope: ``"sequence"`` | ``"batch"``. generator: as in :func:`tip_mask`.

    Returns:
        (selected, weights): BoolTensor [B, T] ⊆ mask, and float [B, T] with 1/π_t at the selected
        positions and 0 elsewhere.
    """
    _check_choice("scope", scope, TIP_SCOPES)
    _check_unit_interval("ratio", ratio, "the expected fraction of supervised tokens kept")
    valid = _valid_positions(mask, student_entropy=student_entropy)
    entropy = _float_at_valid("student_entropy", student_entropy, valid)
    weights = entropy.clamp_min(ENTROPY_SAMPLE_FLOOR).masked_fill(~valid, 0.0)
    if scope == "batch":
        totals = weights.sum().expand(weights.shape[0], 1)
        budget = _selection_budget(valid.sum().reshape(1), ratio).expand(weights.shape[0])
    else:
        totals = weights.sum(dim=1, keepdim=True)
        budget = _selection_budget(valid.sum(dim=1), ratio)
    inclusion = (budget.unsqueeze(1) * weights / totals.clamp_min(ENTROPY_SAMPLE_FLOOR)).clamp(max=1.0)
    uniform = torch.rand(weights.shape, generator=generator, device=weights.device, dtype=torch.float64)
    selected = (uniform < inclusion) & valid
    inverse = torch.where(selected, 1.0 / inclusion.clamp_min(torch.finfo(inclusion.dtype).tiny), 0.0)
    return selected, inverse


@torch.no_grad()
def tip_quadrants(student_entropy: Tensor, divergence: Tensor, mask: Tensor) -> dict[str, float]:
    """Shares of the valid tokens in TIP's four quadrants (methods.md §3.1 Table 1, logged by §7).

    Entropy h and divergence δ are split at their medians over the valid tokens of the batch (the
    median of an even count is the mean of the two middle values, ``torch.quantile(·, 0.5)``); "high"
    means strictly above the median. Keys: ``q1`` high h / high δ, ``q2`` high h / low δ, ``q3`` low h /
    high δ, ``q4`` low h / low δ; the shares sum to 1, and are all 0.0 when no token is valid.

    Args:
        student_entropy, divergence, mask: [B, T].
    """
    valid = _valid_positions(mask, student_entropy=student_entropy, divergence=divergence)
    if not valid.any():
        return {"q1": 0.0, "q2": 0.0, "q3": 0.0, "q4": 0.0}
    entropy = _float_at_valid("student_entropy", student_entropy, valid)[valid]
    divergence = _float_at_valid("divergence", divergence, valid)[valid]
    high_entropy = entropy > torch.quantile(entropy, 0.5)
    high_divergence = divergence > torch.quantile(divergence, 0.5)
    count = entropy.numel()

    def share(in_quadrant: Tensor) -> float:
        return in_quadrant.sum().item() / count

    return {
        "q1": share(high_entropy & high_divergence),
        "q2": share(high_entropy & ~high_divergence),
        "q3": share(~high_entropy & high_divergence),
        "q4": share(~high_entropy & ~high_divergence),
    }


# --------------------------------------------------------------------------------------------------------
# PW-OPSD position weights
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def position_weights(
    mask: Tensor,
    *,
    w_min: float = 0.25,
    tau: float = 0.30,
    slope: float = 0.10,
    direction: str = "increasing",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """PW-OPSD sigmoid position weights (methods.md §4.1; defaults = the "Moderate" schedule).

    For each row b with L_b = Σ_t m_b,t valid tokens, i_t = the 1-based index of token t among the row's
    valid tokens, u_t = (i_t − 0.5) / L_b ∈ (0, 1), and

        increasing:  w_t = w_min + (1 − w_min) · σ((u_t − τ) / s)
        decreasing:  w_t = w_min + (1 − w_min) · σ(((1 − u_t) − τ) / s)      (the mirror image, §4.4 item 6)

    Positions count only valid tokens, so left or interior padding does not shift them; the position is
    relative to the row's own length, never to the padded width T.

    Args:
        mask: [B, T] supervised tokens (non-zero = valid).
        w_min: floor weight in [0, 1]. tau: centre τ of the sigmoid in relative position. slope: s > 0.
        direction: ``"increasing"`` (PW-OPSD: late tokens count more) or ``"decreasing"``.
        dtype: floating dtype of the result.

    Returns:
        Tensor [B, T] of weights in [w_min, 1] at valid positions and 0 elsewhere (no gradient).
    """
    _check_choice("direction", direction, POSITION_DIRECTIONS)
    if not 0.0 <= w_min <= 1.0:
        raise ValueError(f"w_min must be in [0, 1] (the weight of the least-weighted tokens), got {w_min!r}.")
    if not slope > 0.0:
        raise ValueError(f"slope must be > 0 (the width s of the sigmoid), got {slope!r}.")
    if not math.isfinite(tau):
        raise ValueError(f"tau must be a finite relative position, got {tau!r}.")
    valid = _valid_positions(mask)
    counts = valid.to(torch.float64)
    lengths = counts.sum(dim=1, keepdim=True).clamp_min(1.0)
    relative = (counts.cumsum(dim=1) - 0.5) / lengths
    if direction == "decreasing":
        relative = 1.0 - relative
    weights = w_min + (1.0 - w_min) * torch.sigmoid((relative - tau) / slope)
    return weights.masked_fill(~valid, 0.0).to(dtype)


# --------------------------------------------------------------------------------------------------------
# EDGE-OPD evidence mask
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evidence_mask(
    teacher_token_logprobs: Tensor,
    student_token_logprobs: Tensor,
    mask: Tensor,
    *,
    mode: str = "threshold",
    threshold: float = 0.0,
    quantile: float = 0.2,
) -> Tensor:
    """EDGE-OPD evidence mask (methods.md §5.2; a trl_opd design, the paper gives no formula).

    The evidence that the privileged context c supports the sampled token is
    e_t = log p_T(ŷ_t | x, c, ŷ_<t) − log p_S(ŷ_t | x, ŷ_<t) (detached). A token is kept when

        mode="threshold":  e_t > threshold
        mode="quantile":   e_t ≥ the (1 − quantile) quantile of e over the valid tokens of the batch
                           (linear interpolation, ``torch.quantile``), i.e. the top ``quantile`` share.

    Args:
        teacher_token_logprobs: [B, T] log-probability of the sampled token under the privileged teacher.
        student_token_logprobs: [B, T] the same under the student on the plain prompt (same T_d).
        mask: [B, T] supervised tokens (non-zero = valid).
        mode: ``"threshold"`` | ``"quantile"``. threshold: τ_e (nats). quantile: q ∈ (0, 1].

    Returns:
        BoolTensor [B, T] ⊆ mask.
    """
    _check_choice("mode", mode, EVIDENCE_MODES)
    if mode == "threshold" and not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number of nats, got {threshold!r}.")
    if mode == "quantile":
        _check_unit_interval("quantile", quantile, "the share of valid tokens with the most evidence kept")
    valid = _valid_positions(
        mask, teacher_token_logprobs=teacher_token_logprobs, student_token_logprobs=student_token_logprobs
    )
    if not valid.any():
        return torch.zeros_like(valid)
    teacher = _float_at_valid("teacher_token_logprobs", teacher_token_logprobs, valid)
    student = _float_at_valid("student_token_logprobs", student_token_logprobs, valid)
    evidence = teacher - student
    if mode == "threshold":
        return (evidence > threshold) & valid
    cutoff = torch.quantile(evidence[valid], 1.0 - quantile)
    return (evidence >= cutoff) & valid
