"""Per-token distillation losses: divergences, sampled-token estimators, reductions and chunked kernels.

Everything here is a pure tensor function (no trainer state). Notation follows methods.md §0:
B batch, T positions, V vocabulary, N flattened supervised tokens, d hidden size, K support size.

* :func:`per_token_divergence` — one per-entry kernel ℓ_{t,v} for every divergence (methods.md §0.3, §1),
  so that the OPSD clip, top-k support restriction and temperature act the same way on all of them.
* :func:`sampled_token_kl`, :func:`sampled_token_loss` — k1/k2/k3 values and the differentiable
  sampled-token loss forms (§0.6).
* :func:`token_loss_coefficients`, :func:`reduce_token_losses` — every reduction of §0.7 as detached
  per-token coefficients c with loss = Σ c ⊙ ℓ.
* :func:`chunked_token_divergence`, :func:`fused_divergence_loss`, :func:`score_tokens` — the same
  divergence computed from hidden states and LM-head weights without materialising [N, V] logits (§0.10.2).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from .reduction import REDUCTIONS, token_units, unit_coefficients  # noqa: F401  (REDUCTIONS: re-exported)

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
ESTIMATORS = ("analytic", "sampled_pg", "k2", "k3", "k3_plus")
SAMPLED_KL_ESTIMATORS = ("k1", "k2", "k3")
SAMPLED_LOSS_ESTIMATORS = ("sampled_pg", "k2", "k3", "k3_plus")
TOP_K_SOURCES = ("student", "teacher", "union")

_NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------------------


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name}={value!r}; choose one of {', '.join(map(repr, choices))}.")


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} must lie in [0, 1].")


def _check_divergence_options(divergence, beta, alpha, temperature, top_k, top_k_source, clip) -> None:
    _check_choice("divergence", divergence, DIVERGENCES)
    _check_unit_interval("beta", beta)
    _check_unit_interval("alpha", alpha)
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 (it divides the logits).")
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1
    ):
        raise ValueError(f"top_k={top_k!r} must be a positive integer, or None for the full vocabulary.")
    _check_choice("top_k_source", top_k_source, TOP_K_SOURCES)
    if clip is not None and not clip > 0:
        raise ValueError(f"clip={clip} must be > 0 (it caps each vocabulary entry's contribution), or None.")


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape[-1:] != teacher.shape[-1:] and what == "logits":
        raise ValueError(
            f"Student and teacher vocabulary sizes differ ({student.shape[-1]} vs {teacher.shape[-1]}). "
            "Slice both logits to the shared tokenizer length (len(tokenizer)) first, or use SimCTTrainer "
            "for teachers with a different tokenizer."
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"Student and teacher {what} must have the same shape, got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}."
        )


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (exact tests); everything else (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------
# The per-entry kernel ℓ_{t,v}
# ---------------------------------------------------------------------------------------------------------


def _weighted_log_ratio(log_p: torch.Tensor, log_q: torch.Tensor | float) -> torch.Tensor:
    """p · (log p − log q) entry-wise, with 0 where p = 0 (0·log 0 = 0).

    The `where` keeps masked entries (log p = log q = −inf, whose difference is NaN) out of both the value
    and the gradient. Where p > 0 but q = 0 the entry is +inf, as the divergence is.
    """
    p = log_p.exp()
    return p * torch.where(p > 0, log_p - log_q, 0.0)


def _log_mixture(log_p: torch.Tensor, weight_p: float, log_q: torch.Tensor) -> torch.Tensor:
    """log(w·p + (1 − w)·q) entry-wise, NaN-free in value and gradient where both p and q are 0."""
    if weight_p == 1.0:
        return log_p
    if weight_p == 0.0:
        return log_q
    a = log_p + math.log(weight_p)
    b = log_q + math.log1p(-weight_p)
    both_zero = (a == _NEG_INF) & (b == _NEG_INF)
    # logaddexp(−inf, −inf) has a NaN gradient; give those entries dummy inputs and restore −inf afterwards.
    mixed = torch.logaddexp(a.masked_fill(both_zero, 0.0), b.masked_fill(both_zero, 0.0))
    return mixed.masked_fill(both_zero, _NEG_INF)


def _per_entry_divergence(
    log_p_s: torch.Tensor, log_p_t: torch.Tensor, divergence: str, beta: float, alpha: float
) -> torch.Tensor:
    """ℓ_{t,v} of methods.md §1 for log-probabilities [..., K] (entries may be −inf). Returns [..., K]."""
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return _weighted_log_ratio(log_p_t, log_p_s)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return _weighted_log_ratio(log_p_s, log_p_t)
    if divergence == "jsd":
        log_m = _log_mixture(log_p_t, beta, log_p_s)  # M = β·p_T + (1 − β)·p_S: β weights the teacher (TRL)
        return beta * _weighted_log_ratio(log_p_t, log_m) + (1 - beta) * _weighted_log_ratio(log_p_s, log_m)
    if divergence == "tvd":
        return 0.5 * (log_p_t.exp() - log_p_s.exp()).abs()
    if divergence == "skew_forward_kl":  # p_T log(p_T / (α p_T + (1 − α) p_S))
        return _weighted_log_ratio(log_p_t, _log_mixture(log_p_t, alpha, log_p_s))
    # skew_reverse_kl: p_S log(p_S / ((1 − α) p_T + α p_S))
    return _weighted_log_ratio(log_p_s, _log_mixture(log_p_s, alpha, log_p_t))


# ---------------------------------------------------------------------------------------------------------
# Support restriction (methods.md §0.5)
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _top_k_support(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, source: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Indices [..., K] of the support and, for "union", a mask [..., K] of repeated indices to drop.

    The union is gathered as the 2k indices TopK(z_S) ∪ TopK(z_T), sorted so that an index chosen by both
    sides sits next to its twin; the second copy is masked out, leaving a set of variable size ≤ 2k.
    """
    if source == "student":
        return student_logits.topk(k, dim=-1).indices, None
    if source == "teacher":
        return teacher_logits.topk(k, dim=-1).indices, None
    both = torch.cat([student_logits.topk(k, dim=-1).indices, teacher_logits.topk(k, dim=-1).indices], dim=-1)
    both = both.sort(dim=-1).values
    repeated = torch.zeros_like(both, dtype=torch.bool)
    repeated[..., 1:] = both[..., 1:] == both[..., :-1]
    return both, repeated


def _safe_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim; −inf (with zero, not NaN, gradient) for rows that are all −inf."""
    row_max = x.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    total = (x - row_max).exp().sum(dim=-1)
    has_mass = total > 0
    log_total = torch.where(has_mass, total, torch.ones_like(total)).log() + row_max.squeeze(-1)
    return log_total.masked_fill(~has_mass, _NEG_INF)


def _renormalised_log_probs(logits, support, repeated) -> torch.Tensor:
    """log p̄ on the support: log-softmax over the gathered logits (repeated entries get probability 0)."""
    gathered = logits.gather(-1, support)
    if repeated is not None:
        gathered = gathered.masked_fill(repeated, _NEG_INF)
    return gathered.log_softmax(dim=-1)


def _log_probs_with_tail(logits, support, repeated) -> torch.Tensor:
    """Full-vocabulary log-probs on the support plus one tail class holding the leftover mass. [..., K + 1]."""
    log_probs = logits.log_softmax(dim=-1)
    on_support = log_probs.gather(-1, support)
    if repeated is not None:
        on_support = on_support.masked_fill(repeated, _NEG_INF)
    # The tail is summed over the complement (not 1 − Σ support) to avoid cancellation when it is small.
    tail = _safe_logsumexp(log_probs.scatter(-1, support, _NEG_INF))
    return torch.cat([on_support, tail.unsqueeze(-1)], dim=-1)


def _support_log_probs(student_logits, teacher_logits, top_k, top_k_source, top_k_tail):
    """(log p_S, log p_T) on the chosen support, [..., K] each (K = V for the full vocabulary)."""
    if top_k is None or (top_k >= student_logits.shape[-1] and not top_k_tail):
        return student_logits.log_softmax(dim=-1), teacher_logits.log_softmax(dim=-1)
    k = min(top_k, student_logits.shape[-1])
    support, repeated = _top_k_support(student_logits, teacher_logits, k, top_k_source)
    to_log_probs = _log_probs_with_tail if top_k_tail else _renormalised_log_probs
    return to_log_probs(student_logits, support, repeated), to_log_probs(teacher_logits, support, repeated)


# ---------------------------------------------------------------------------------------------------------
# Dense per-token divergence
# ---------------------------------------------------------------------------------------------------------


def per_token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_k_source: str = "student",
    clip: float | None = None,
    top_k_tail: bool = False,
) -> torch.Tensor:
    """Divergence between the student's and the teacher's next-token distributions at every position.

    ℓ_t = Σ_v min(ℓ_{t,v}, clip), with ℓ_{t,v} the per-entry contribution of methods.md §1 computed from
    p_S = softmax(z_S / T), p_T = softmax(z_T / T) on the support.

    Args:
        student_logits: [..., V] student logits (any float dtype; gradient flows through them).
        teacher_logits: [..., V] teacher logits: a target, detached here (sg(·) of methods.md §0.2), so a
            teacher computed with gradients (e.g. a self-teacher sharing the student's modules) never gets any.
        divergence: "forward_kl" = KL(p_T ‖ p_S); "reverse_kl" = KL(p_S ‖ p_T); "jsd" = TRL's generalized
            JSD with M = β p_T + (1 − β) p_S (β weights the teacher; β = 0 is exactly forward_kl and β = 1
            exactly reverse_kl, as TRL special-cases them); "tvd" = ½ Σ|p_T − p_S|; "skew_forward_kl" =
            KL(p_T ‖ α p_T + (1 − α) p_S); "skew_reverse_kl" = KL(p_S ‖ (1 − α) p_T + α p_S).
        beta: JSD mixture weight in [0, 1]; used only by "jsd" (validated, otherwise ignored).
        alpha: skew weight in [0, 1]; used only by the skew KLs (validated, otherwise ignored).
        temperature: T_d > 0, divides both logits before the log-softmax. No T² factor.
        top_k: restrict to k entries per position (None: full vocabulary). k ≥ V means the full vocabulary.
        top_k_source: "student" (TopK(z_S)), "teacher" (TopK(z_T)) or "union" (TopK(z_S) ∪ TopK(z_T), of
            variable size ≤ 2k). The support indices carry no gradient. Both distributions are renormalised
            on the support (log-softmax over the gathered logits).
        clip: OPSD per-entry clamp τ > 0 applied from above to every ℓ_{t,v} before the vocabulary sum
            (entries above τ get zero gradient; negative entries are kept, so the sum can be negative).
        top_k_tail: with top_k, do not renormalise: append one tail class per side holding the leftover
            mass 1 − Σ_{v∈S} p(v) from the full-vocabulary softmax (TRL's ``loss_add_tail``); the clip
            applies to the tail entry like to any other.

    Returns:
        [...] float32 per-position divergence (float64 if the inputs are float64). Logits of −inf (masked
        vocabulary entries) are handled with 0·log 0 = 0 and give finite values and gradients as long as
        the teacher does not put mass where the student has none (then forward KL is +inf, as it should be).
    """
    _check_divergence_options(divergence, beta, alpha, temperature, top_k, top_k_source, clip)
    _check_same_shape(student_logits, teacher_logits, "logits")
    dtype = _compute_dtype(student_logits)
    z_s = student_logits.to(dtype) / temperature
    z_t = teacher_logits.detach().to(dtype) / temperature
    log_p_s, log_p_t = _support_log_probs(z_s, z_t, top_k, top_k_source, top_k_tail)
    return _divergence_from_log_probs(log_p_s, log_p_t, divergence, beta, alpha, clip)


def _divergence_from_log_probs(log_p_s, log_p_t, divergence, beta, alpha, clip) -> torch.Tensor:
    """Σ_v min(ℓ_{t,v}, clip) from both sides' log-probabilities on the support."""
    per_entry = _per_entry_divergence(log_p_s, log_p_t, divergence, beta, alpha)
    if clip is not None:
        per_entry = per_entry.clamp(max=clip)
    return per_entry.sum(dim=-1)


def divergence_from_trl_beta(beta: float) -> str:
    """The trl_opd ``divergence`` equivalent to TRL/GKD's ``beta`` (0 → forward_kl, 1 → reverse_kl, else jsd).

    For "jsd" keep passing the same ``beta`` to :func:`per_token_divergence`.
    """
    _check_unit_interval("beta", beta)
    if beta == 0:
        return "forward_kl"
    if beta == 1:
        return "reverse_kl"
    return "jsd"


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy H(softmax(z / T)) in nats, [..., V] -> [...], float32 (float64 for float64 input); 0·log 0 = 0."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 (it divides the logits).")
    log_p = (logits.to(_compute_dtype(logits)) / temperature).log_softmax(dim=-1)
    return _entropy_from_log_probs(log_p)


def _entropy_from_log_probs(log_p: torch.Tensor) -> torch.Tensor:
    """H(p) = −Σ_v p_v log p_v over the last dim from log p; entries with p = 0 (logit −inf) contribute 0."""
    return -_weighted_log_ratio(log_p, 0.0).sum(dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Sampled-token estimators (methods.md §0.6)
# ---------------------------------------------------------------------------------------------------------


def sampled_token_kl(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """Schulman's k1/k2/k3 estimates of KL(p_S ‖ p_T) from the sampled token's log-probs.

    With log r = log p_T(ŷ) − log p_S(ŷ) (both at T_d): k1 = −log r (unbiased, any sign), k2 = ½ (log r)²
    (biased, ≥ 0), k3 = (r − 1) − log r (unbiased, ≥ 0). Inputs [...] (same shape), output [...] in the
    input's dtype; gradients flow through the student's log-probs only (the teacher is a target, detached here).
    Do not backpropagate k1 (its expected gradient is 0): use :func:`sampled_token_loss` for training.
    """
    _check_choice("estimator", estimator, SAMPLED_KL_ESTIMATORS)
    _check_same_shape(student_logprobs, teacher_logprobs, "log-probs")
    log_ratio = teacher_logprobs.detach() - student_logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    return torch.expm1(log_ratio) - log_ratio


def sampled_token_loss(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, estimator: str
) -> torch.Tensor:
    """Differentiable per-token loss from the sampled token ŷ ~ p_S; the teacher is detached. [...] -> [...].

    Expected gradients over ŷ ~ p_S (methods.md §0.6):

    * "sampled_pg": −sg(log p_T − log p_S) · log p_S (OPSD Eq. 9 / tinker advantage form); gradient = ∇k2,
      i.e. ∇KL(p_S ‖ p_T). Its value is not a divergence (log it via :func:`sampled_token_kl`).
    * "k2": ½ (log p_S − log p_T)², gradient ∇KL(p_S ‖ p_T).
    * "k3": (r − 1) − log r, gradient ∇KL(p_T ‖ p_S) (the *forward*-KL gradient).
    * "k3_plus": value of k3, gradient of k2.
    """
    _check_choice("estimator", estimator, SAMPLED_LOSS_ESTIMATORS)
    _check_same_shape(student_logprobs, teacher_logprobs, "log-probs")
    teacher_logprobs = teacher_logprobs.detach()
    if estimator == "sampled_pg":
        advantage = (teacher_logprobs - student_logprobs).detach()
        return -advantage * student_logprobs
    if estimator in ("k2", "k3"):
        return sampled_token_kl(student_logprobs, teacher_logprobs, estimator)
    k2 = sampled_token_kl(student_logprobs, teacher_logprobs, "k2")
    k3 = sampled_token_kl(student_logprobs, teacher_logprobs, "k3")
    return k3.detach() + (k2 - k2.detach())


# ---------------------------------------------------------------------------------------------------------
# Reductions (methods.md §0.7) as per-token coefficients
# ---------------------------------------------------------------------------------------------------------


def _weighted_mask(mask: torch.Tensor, weights: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}.")
    mask = mask.detach().to(dtype)
    if weights is None:
        return mask
    if weights.shape != mask.shape:
        raise ValueError(f"weights shape {tuple(weights.shape)} must equal mask shape {tuple(mask.shape)}.")
    weights = weights.detach().to(dtype)
    if bool((weights < 0).any()):
        raise ValueError("weights must be non-negative (they scale per-token losses).")
    return mask * weights


def _coefficients(mask, weights, reduction, num_items, num_sequences, dtype) -> torch.Tensor:
    """`reduction.unit_coefficients` with one unit per position of the [B, T] mask."""
    weighted = _weighted_mask(mask, weights, dtype)  # validates shapes and signs
    rows, tokens, row_tokens = token_units(mask.to(dtype))
    coefficients = unit_coefficients(
        reduction, rows, tokens, row_tokens, None if weights is None else weighted.reshape(-1),
        num_items=num_items, num_sequences=num_sequences, dtype=dtype,
    )
    return coefficients.reshape(mask.shape)


def token_loss_coefficients(
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    reduction: str = "token_mean",
    num_items=None,
    num_sequences=None,
) -> torch.Tensor:
    """Detached coefficients c [B, T] such that the micro-batch loss is Σ_{b,t} c_{b,t} · ℓ_{b,t}.

    With m the supervision mask and w the token weights (default 1), L_b = Σ_t m_{b,t}:

    * "token_mean": m·w / num_items. The trainer passes num_items = N_step / num_processes (generated
      tokens of the whole optimizer step, counted by m not w), which makes the sum over micro-batches and
      ranks equal Σ X / N_step. Default num_items: Σ m of this micro-batch (at least 1).
    * "token_mean_microbatch": m·w / max(Σ m, 1) (the OPSD reference code).
    * "sequence_mean": m·w / (L_b · num_sequences), 0 on rows with L_b = 0; num_sequences defaults to the
      number of rows with L_b ≥ 1 (at least 1). Pass the step's count for GA-exact sequence means.
    * "weighted_mean": m·w / Σ(m·w) — the mean over selected tokens (TIP Eq. 9). It normalises within this
      micro-batch (no cross-micro-batch normaliser); all-zero weights give all-zero coefficients.

    Args:
        mask: [B, T] bool or {0, 1} supervision mask.
        weights: optional [B, T] non-negative token weights or selection mask (detached here).
    Returns:
        [B, T] float32 (float64 if weights are float64), no gradient.
    """
    dtype = torch.float64 if weights is not None and weights.dtype == torch.float64 else torch.float32
    return _coefficients(mask, weights, reduction, num_items, num_sequences, dtype)


def reduce_token_losses(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    reduction: str = "token_mean",
    num_items=None,
    num_sequences=None,
) -> torch.Tensor:
    """Scalar loss Σ c ⊙ ℓ with c from :func:`token_loss_coefficients`. per_token [B, T] (gradient kept).

    Unsupervised positions are excluded with a ``where``, so garbage (NaN/inf) there cannot leak in.
    """
    if per_token.shape != mask.shape:
        raise ValueError(
            f"per_token shape {tuple(per_token.shape)} must equal mask shape {tuple(mask.shape)}."
        )
    dtype = _compute_dtype(per_token)
    coefficients = _coefficients(mask, weights, reduction, num_items, num_sequences, dtype).to(
        per_token.dtype
    )
    kept = torch.where(coefficients != 0, per_token, torch.zeros_like(per_token))
    return (coefficients * kept).sum()


def top_k_mass(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    top_k: int,
    top_k_source: str = "student",
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unrenormalised mass Σ_{v∈S} p(v) of the top-k support, per side: ([...], [...]), no gradient.

    methods.md §0.5 asks to log both when top-k is on: a falling student mass is the collapse signature.
    """
    _check_divergence_options("reverse_kl", 0.5, 0.1, temperature, top_k, top_k_source, None)
    _check_same_shape(student_logits, teacher_logits, "logits")
    with torch.no_grad():
        dtype = _compute_dtype(student_logits)
        z_s, z_t = student_logits.to(dtype) / temperature, teacher_logits.to(dtype) / temperature
        k = min(top_k, z_s.shape[-1])
        support, repeated = _top_k_support(z_s, z_t, k, top_k_source)

        def mass(logits):
            probs = logits.softmax(dim=-1).gather(-1, support)
            return (probs if repeated is None else probs.masked_fill(repeated, 0.0)).sum(dim=-1)

        return mass(z_s), mass(z_t)


# ---------------------------------------------------------------------------------------------------------
# Chunked paths from hidden states and LM-head weights (no [N, V] logits)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputHead:
    """A causal LM's output layer, the one head type of the package: logits = softcap(s · (h Wᵀ + b))[:, :V'].

    `scale` s covers the architectures that rescale logits (Cohere `logit_scale`, Falcon-H1 `lm_head_multiplier`,
    Granite/MiniCPM3 `1/logits_scaling`, ...; read by `trainers.lm_head.output_head`); `softcap` is Gemma-2's
    `final_logit_softcapping`; `vocab_size` V' keeps the first V' entries (heads padded around one tokenizer,
    methods.md §0.8; None: all). The chunked kernels receive `scaled_hidden(h)` and a head with s = 1, so their
    fused gradients only have to go through h Wᵀ + b.
    """

    weight: torch.Tensor  # [V, d]
    bias: torch.Tensor | None = None  # [V]
    softcap: float | None = None
    scale: float = 1.0
    vocab_size: int | None = None

    def scaled_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Fold the logit scale into the hidden states, (h·s)Wᵀ = s·(hWᵀ): exact without a bias, refused with one."""
        if self.scale == 1.0:
            return hidden
        if self.bias is not None:
            raise ValueError("A logit scale together with an lm_head bias is not supported by trl_opd's loss kernels.")
        return hidden * self.scale

    def raw_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """s · (h Wᵀ + b) before soft-capping, [n, V'], in the compute dtype (float32, or float64 for float64).

        When hidden and weight share a dtype the matmul runs in it (bf16 models: bf16 logits upcast to
        float32, as the model itself computes them); otherwise both are cast to the compute dtype.
        """
        hidden = self.scaled_hidden(hidden)
        dtype = _compute_dtype(hidden)
        weight = self.weight[: self.vocab_size]
        if weight.dtype != hidden.dtype:
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        logits = (hidden @ weight.t()).to(dtype)
        if self.bias is not None:
            logits = logits + self.bias[: self.vocab_size].to(dtype)
        return logits

    def cap(self, raw_logits: torch.Tensor) -> torch.Tensor:
        """Gemma-2's final_logit_softcapping: cap · tanh(z / cap) (identity without a cap)."""
        if self.softcap is None:
            return raw_logits
        return self.softcap * torch.tanh(raw_logits / self.softcap)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cap(self.raw_logits(hidden))

    @property
    def width(self) -> int:
        """V': the number of logits this head gives."""
        return self.weight.shape[0] if self.vocab_size is None else self.vocab_size


def check_served_temperature(served: float, asked: float) -> None:
    """Served log-probs are at the temperature the server applied; a loss at another T_d cannot use them."""
    if asked != served:
        raise ValueError(
            f"The served teacher's log-probs are at temperature {served}, but the loss asks for T_d = {asked}; a "
            "served log-prob cannot be re-tempered without the rest of the vocabulary."
        )


class TeacherLogits:
    """A teacher whose logits the chunked kernels read row by row, in the place of an `OutputHead` (a served teacher,
    several teachers): its "hidden states" are row indices ([N] long, `row_indices()`) and `logits(rows)` returns
    `[n, V']` teacher logits for them, at `width` V'. The kernels take it whole as `teacher_head`."""

    bias = None
    softcap = None

    @property
    def width(self) -> int:
        return self.vocab_size

    def scaled_hidden(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def check_temperature(self, temperature: float) -> None:
        """Raise if these logits cannot be read at T_d = `temperature` (served log-probs have one temperature)."""


@dataclass(frozen=True)
class SparseTeacherLogits(TeacherLogits):
    """A teacher known by its log-probs at a few ids per token (a served teacher: vLLM's top-k `prompt_logprobs`, or
    trl_opd's server at the student's top-k ids), in the place of the teacher's `OutputHead` in the chunked kernels.

    Its "hidden states" are row indices (`row_indices()`, [N] long): `logits(rows)` gives `[n, V']` teacher logits
    z with z[i, ids[i, j]] = logprobs[i, j] and every other entry log(r_i / (V' − m_i)), the leftover mass
    r_i = 1 − Σ_j exp(logprobs[i, j]) spread evenly over the m_i-complement (−inf when nothing is left). So
    log softmax(z) gives the served log-probs back exactly and 1 − Σ p on the complement (methods.md §0.9):

    * teacher-top-k' support, k' ≤ k, with or without the tail class, equals the support computed from the full
      teacher logits (TopK(z) is the served top-k: every id off it has p ≤ the k-th largest, so their mean r/(V'−k)
      does too; only an exact tie of every tail id could reorder them);
    * student-top-k support (ids sent to the server) with or without tail equals it as well: the support is read
      from the student's logits, and the tail is the leftover mass.
    The log-probs are at one temperature; the kernels must use T_d = 1 on them (`check_temperature`). Entries with
    id −1 are padding (ragged supports).
    """

    token_ids: torch.Tensor  # [N, m] long, −1 = padding
    logprobs: torch.Tensor  # [N, m] float
    vocab_size: int
    temperature: float = 1.0

    def row_indices(self) -> torch.Tensor:
        return torch.arange(self.token_ids.shape[0], device=self.token_ids.device)

    def check_temperature(self, temperature: float) -> None:
        check_served_temperature(self.temperature, temperature)

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        ids, logprobs = self.token_ids[rows], self.logprobs[rows].double()
        present = ids >= 0
        logprobs = logprobs.masked_fill(~present, _NEG_INF)
        kept_mass = torch.logsumexp(logprobs, dim=-1).exp().clamp(max=1.0)
        leftover = (1.0 - kept_mass).clamp(min=0.0)
        spread = (self.vocab_size - present.sum(-1)).clamp(min=1)
        fill = torch.where(leftover > 0, (leftover / spread).log(), torch.full_like(leftover, _NEG_INF))
        # One spare column takes the padding entries, so they never overwrite a real id.
        dense = fill.unsqueeze(-1).expand(len(ids), self.vocab_size + 1).clone()
        dense.scatter_(-1, torch.where(present, ids, self.vocab_size), logprobs)
        return dense[:, : self.vocab_size].to(self.logprobs.dtype)


_DIVERGENCE_DEFAULTS = {
    "divergence": "reverse_kl",
    "beta": 0.5,
    "alpha": 0.1,
    "temperature": 1.0,
    "top_k": None,
    "top_k_source": "student",
    "clip": None,
    "top_k_tail": False,
}


def _divergence_options(options: dict) -> dict:
    """Fill in per_token_divergence's defaults and validate, so bad options fail before any chunk runs."""
    unknown = set(options) - set(_DIVERGENCE_DEFAULTS)
    if unknown:
        raise ValueError(
            f"Unknown divergence option(s) {sorted(unknown)}; accepted: {sorted(_DIVERGENCE_DEFAULTS)}."
        )
    merged = {**_DIVERGENCE_DEFAULTS, **options}
    _check_divergence_options(
        *(
            merged[key]
            for key in ("divergence", "beta", "alpha", "temperature", "top_k", "top_k_source", "clip")
        )
    )
    return merged


def _check_head(name: str, hidden: torch.Tensor, weight: torch.Tensor, bias, softcap) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"{name}_hidden must be [N, d] and {name}_head [V, d]; got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)} (flatten the supervised positions first)."
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{name}_hidden width {hidden.shape[1]} does not match {name}_head width {weight.shape[1]}."
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{name}_bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}.")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{name} softcap={softcap} must be > 0, or None.")


def _prepare_chunked(
    student_hidden,
    student_head,
    student_bias,
    softcap,
    teacher_hidden,
    teacher_head,
    teacher_bias,
    teacher_softcap,
    vocab_size,
    chunk_size,
    divergence_kwargs,
) -> tuple[OutputHead, OutputHead, dict]:
    """Validate the chunked-path inputs; bundle each side's output layer and the full divergence options. A
    `TeacherLogits` teacher comes whole in `teacher_head`, with row indices as its `teacher_hidden`."""
    _check_head("student", student_hidden, student_head, student_bias, softcap)
    if isinstance(teacher_head, TeacherLogits):
        return _prepare_row_teacher(student_hidden, student_head, student_bias, softcap, teacher_hidden,
                                       teacher_head, vocab_size, chunk_size, divergence_kwargs)
    _check_head("teacher", teacher_hidden, teacher_head, teacher_bias, teacher_softcap)
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"student_hidden has {student_hidden.shape[0]} tokens but teacher_hidden has {teacher_hidden.shape[0]}."
        )
    rows = (student_head.shape[0], teacher_head.shape[0])
    if vocab_size is None:
        if rows[0] != rows[1]:
            raise ValueError(
                f"LM heads have different vocabulary sizes {rows}; pass vocab_size=len(tokenizer) to slice both "
                "(padded heads), or use SimCTTrainer for different tokenizers."
            )
        vocab_size = rows[0]
    if not 1 <= vocab_size <= min(rows):
        raise ValueError(
            f"vocab_size={vocab_size} must be between 1 and the smaller LM head size {min(rows)}."
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of tokens.")
    return (
        OutputHead(student_head, student_bias, softcap, vocab_size=vocab_size),
        OutputHead(teacher_head, teacher_bias, teacher_softcap, vocab_size=vocab_size),
        _divergence_options(divergence_kwargs),
    )


def _prepare_row_teacher(student_hidden, student_head, student_bias, softcap, teacher_rows,
                            teacher: TeacherLogits, vocab_size, chunk_size, divergence_kwargs):
    """`_prepare_chunked` for `TeacherLogits`: they cover the compared vocabulary (at one temperature if served)."""
    vocab_size = teacher.vocab_size if vocab_size is None else vocab_size
    if vocab_size != teacher.vocab_size or vocab_size > student_head.shape[0]:
        raise ValueError(
            f"The teacher's logits cover {teacher.vocab_size} ids, the loss compares {vocab_size} and the "
            f"student's head has {student_head.shape[0]} rows."
        )
    if teacher_rows.shape[0] != student_hidden.shape[0]:
        raise ValueError(f"{teacher_rows.shape[0]} served teacher rows for {student_hidden.shape[0]} student tokens.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of tokens.")
    options = _divergence_options(divergence_kwargs)
    teacher.check_temperature(options["temperature"])
    return OutputHead(student_head, student_bias, softcap, vocab_size=vocab_size), teacher, options


def _chunks(num_tokens: int, chunk_size: int) -> list[slice]:
    """Row slices of at most chunk_size tokens; one empty slice for N = 0 so outputs keep their shapes."""
    return [
        slice(start, min(start + chunk_size, num_tokens))
        for start in range(0, max(num_tokens, 1), chunk_size)
    ]


def _chunk_divergence(student_hidden, teacher_hidden, student: OutputHead, teacher: OutputHead, options: dict):
    """Per-token divergence of one chunk: [n, d_s], [n, d_t] -> [n]; the teacher side carries no graph."""
    with torch.no_grad():
        teacher_logits = teacher.logits(teacher_hidden)
    return per_token_divergence(student.logits(student_hidden), teacher_logits, **options)


def chunked_token_divergence(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    teacher_softcap: float | None = None,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
    **divergence_kwargs,
) -> torch.Tensor:
    """:func:`per_token_divergence` from hidden states and LM heads, chunk by chunk. Returns [N].

    Only one chunk's [chunk_size, V] logits are alive at a time: each chunk is wrapped in
    ``torch.utils.checkpoint`` (non-reentrant) and recomputed in backward. Gradients reach student_hidden,
    student_head and student_bias; the teacher side runs under no_grad.

    Args:
        student_hidden: [N, d_s] student hidden states at the supervised positions (before the LM head).
        student_head: [V_s, d_s] student LM-head weight; student_bias: optional [V_s].
        teacher_hidden: [N, d_t]; teacher_head: [V_t, d_t]; teacher_bias: optional [V_t].
        softcap / teacher_softcap: final-logit soft-capping (Gemma-2, cap · tanh(z / cap)) of the student /
            teacher logits, applied before the temperature. Each side has its own (None: no capping).
        vocab_size: keep only the first vocab_size logits of both heads (padded LM heads, methods.md §0.8).
            Required when V_s ≠ V_t.
        chunk_size: tokens per chunk.
        **divergence_kwargs: any option of :func:`per_token_divergence` (divergence, beta, alpha,
            temperature, top_k, top_k_source, clip, top_k_tail).
    """
    student, teacher, options = _prepare_chunked(
        student_hidden,
        student_head,
        student_bias,
        softcap,
        teacher_hidden,
        teacher_head,
        teacher_bias,
        teacher_softcap,
        vocab_size,
        chunk_size,
        divergence_kwargs,
    )
    teacher_hidden = teacher_hidden.detach()
    pieces = []
    for rows in _chunks(student_hidden.shape[0], chunk_size):
        if torch.is_grad_enabled():
            piece = checkpoint(
                _chunk_divergence,
                student_hidden[rows],
                teacher_hidden[rows],
                student,
                teacher,
                options,
                use_reentrant=False,
            )
        else:
            piece = _chunk_divergence(student_hidden[rows], teacher_hidden[rows], student, teacher, options)
        pieces.append(piece)
    return torch.cat(pieces)


def _autograd_chunk(hidden, coefficients, student: OutputHead, teacher_logits, options):
    """Loss, per-token loss, student entropy and d(Σ c ℓ)/d(raw logits) of one chunk, without a lasting graph.

    The gradient is taken with ``torch.autograd.grad`` on the chunk's pre-softcap logits, so it is exact for
    every divergence, top-k support, clip, temperature and soft-cap; only this chunk's graph ever exists.
    """
    with torch.no_grad():
        raw_logits = student.raw_logits(hidden)
    raw_logits.requires_grad_(True)
    with torch.enable_grad():
        logits = student.cap(raw_logits)
        per_token = per_token_divergence(logits, teacher_logits, **options)
        kept = torch.where(coefficients != 0, per_token, 0.0)
        chunk_loss = (coefficients * kept).sum()
        (grad_logits,) = torch.autograd.grad(chunk_loss, raw_logits)
    entropy = entropy_from_logits(logits.detach(), options["temperature"])
    return chunk_loss.detach(), per_token.detach(), entropy, grad_logits


def _has_closed_form_gradient(options: dict) -> bool:
    """Full-vocabulary forward KL, reverse KL and JSD have closed-form logit gradients (no clip, no top-k)."""
    closed_form = options["divergence"] in ("forward_kl", "reverse_kl", "jsd")
    return closed_form and options["top_k"] is None and options["clip"] is None


@torch.no_grad()
def _closed_form_chunk(hidden, coefficients, student: OutputHead, teacher_logits, options):
    """Same outputs as :func:`_autograd_chunk` from the closed-form gradients w.r.t. z = logits / T:

    dFKL/dz = p_S − p_T;  dRKL/dz = p_S (log p_S − log p_T − RKL);
    dJSD_β/dz = (1 − β) p_S (log p_S − log M − KL(p_S ‖ M))   (methods.md §1; TRL's kernel uses the same).
    Skipping autograd saves about half of the elementwise work; tests check equality with the autograd path.
    """
    temperature, divergence, beta = options["temperature"], options["divergence"], options["beta"]
    logits = student.cap(student.raw_logits(hidden))
    log_p_s = (logits / temperature).log_softmax(dim=-1)
    log_p_t = (teacher_logits / temperature).log_softmax(dim=-1)
    p_s = log_p_s.exp()
    entropy = _entropy_from_log_probs(log_p_s)
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        per_token = _weighted_log_ratio(log_p_t, log_p_s).sum(dim=-1)
        grad = p_s - log_p_t.exp()
    elif divergence == "reverse_kl" or beta == 1.0:
        grad = torch.where(p_s > 0, log_p_s - log_p_t, 0.0)  # log p_S − log p_T, 0 where p_S = 0
        per_token = (p_s * grad).sum(dim=-1)
        grad = grad.sub_(per_token.unsqueeze(-1)).mul_(p_s)
    else:
        log_m = _log_mixture(log_p_t, beta, log_p_s)
        grad = torch.where(p_s > 0, log_p_s - log_m, 0.0)
        kl_student = (p_s * grad).sum(dim=-1)
        per_token = beta * _weighted_log_ratio(log_p_t, log_m).sum(dim=-1) + (1 - beta) * kl_student
        grad = grad.sub_(kl_student.unsqueeze(-1)).mul_(p_s).mul_(1 - beta)
    selected = (coefficients != 0).unsqueeze(-1)
    grad = grad.mul_(coefficients.unsqueeze(-1) / temperature).masked_fill_(~selected, 0.0)
    if student.softcap is not None:  # d/dr [c tanh(r / c)] = 1 − tanh²(r / c)
        grad = grad.mul_(1 - (logits / student.softcap).square())
    chunk_loss = (coefficients * torch.where(selected.squeeze(-1), per_token, 0.0)).sum()
    return chunk_loss, per_token, entropy, grad


class _FusedDivergenceFunction(torch.autograd.Function):
    """Liger-style fused linear + divergence: gradients are computed in forward, backward only scales them."""

    @staticmethod
    def forward(
        ctx,
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        coefficients,
        student: OutputHead,
        teacher: OutputHead,
        options: dict,
        chunk_size: int,
    ):
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        dtype = _compute_dtype(student_hidden)
        vocab = student.width
        num_tokens = student_hidden.shape[0]
        grad_hidden = student_hidden.new_zeros(student_hidden.shape, dtype=dtype) if needs_hidden else None
        grad_weight = student_weight.new_zeros(student_weight.shape, dtype=dtype) if needs_weight else None
        grad_bias = student_bias.new_zeros(student_bias.shape, dtype=dtype) if needs_bias else None
        loss = student_hidden.new_zeros((), dtype=dtype)
        per_token = student_hidden.new_zeros(num_tokens, dtype=dtype)
        entropy = student_hidden.new_zeros(num_tokens, dtype=dtype)
        weight = student_weight[:vocab]
        fused_chunk = _closed_form_chunk if _has_closed_form_gradient(options) else _autograd_chunk
        for rows in _chunks(num_tokens, chunk_size):
            hidden = student_hidden[rows]
            teacher_logits = teacher.logits(teacher_hidden[rows])
            chunk_loss, per_token[rows], entropy[rows], grad_logits = fused_chunk(
                hidden, coefficients[rows].to(dtype), student, teacher_logits, options
            )
            loss += chunk_loss
            # Project d loss / d logits back through logits = h Wᵀ + b (matmuls in the weight's dtype,
            # accumulation in the compute dtype).
            grad_logits_w = grad_logits.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits_w @ weight).to(dtype)
            if grad_weight is not None:
                grad_weight[:vocab] += (grad_logits_w.t() @ hidden.to(weight.dtype)).to(dtype)
            if grad_bias is not None:
                grad_bias[:vocab] += grad_logits.sum(dim=0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.input_dtypes = tuple(
            None if t is None else t.dtype for t in (student_hidden, student_weight, student_bias)
        )
        ctx.mark_non_differentiable(per_token, entropy)
        return loss, per_token, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_token, _grad_entropy):
        scaled = [
            None if grad is None else (grad * grad_loss).to(input_dtype)
            for grad, input_dtype in zip(ctx.saved_tensors, ctx.input_dtypes)
        ]
        return (*scaled, None, None, None, None, None, None)


def fused_divergence_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    coefficients: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    teacher_softcap: float | None = None,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
    **divergence_kwargs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Σ_i c_i ℓ_i from hidden states and LM heads in one pass, Liger-Kernel "fused linear" style.

    Chunk by chunk the forward computes the logits, ℓ_i (:func:`per_token_divergence`), and the gradient of
    Σ c_i ℓ_i with respect to the chunk's logits, projects it to d/d student_hidden (stored, [N, d_s]) and
    accumulates d/d student_head ([V, d_s]) and d/d student_bias. The backward only multiplies the stored
    gradients by the incoming scalar gradient: no recomputation, and only one chunk's logits alive at a time.
    Arguments as in :func:`chunked_token_divergence`, plus:

    Args:
        coefficients: [N] detached per-token coefficients (e.g. :func:`token_loss_coefficients` at the
            supervised positions); tokens with c_i = 0 add nothing to the loss or the gradients. No gradient
            flows to them.

    Returns:
        (loss, per_token, student_entropy): scalar loss with gradient to student_hidden / student_head /
        student_bias; [N] detached per-token divergence; [N] detached student entropy at the distillation
        temperature over the full (vocab_size-sliced) vocabulary. float32 (float64 for float64 inputs).
    """
    student, teacher, options = _prepare_chunked(
        student_hidden,
        student_head,
        student_bias,
        softcap,
        teacher_hidden,
        teacher_head,
        teacher_bias,
        teacher_softcap,
        vocab_size,
        chunk_size,
        divergence_kwargs,
    )
    if coefficients.shape != student_hidden.shape[:1]:
        raise ValueError(
            f"coefficients must have shape [{student_hidden.shape[0]}] (one per token), got {tuple(coefficients.shape)}."
        )
    trainable = [t for t in (student_hidden, student_head, student_bias) if t is not None and t.requires_grad]
    if not (torch.is_grad_enabled() and trainable):  # evaluation: skip the gradient work altogether
        return _no_grad_loss(
            student_hidden, teacher_hidden, coefficients, student, teacher, options, chunk_size
        )
    return _FusedDivergenceFunction.apply(
        student_hidden,
        student_head,
        student_bias,
        teacher_hidden.detach(),
        coefficients.detach(),
        student,
        teacher,
        options,
        chunk_size,
    )


@torch.no_grad()
def _no_grad_loss(
    student_hidden, teacher_hidden, coefficients, student: OutputHead, teacher: OutputHead, options, chunk_size
):
    """fused_divergence_loss's outputs when no gradient is wanted."""
    per_token, entropy = [], []
    for rows in _chunks(student_hidden.shape[0], chunk_size):
        logits = student.logits(student_hidden[rows])
        per_token.append(per_token_divergence(logits, teacher.logits(teacher_hidden[rows]), **options))
        entropy.append(entropy_from_logits(logits, options["temperature"]))
    per_token, entropy = torch.cat(per_token), torch.cat(entropy)
    coefficients = coefficients.to(per_token.dtype)
    return (coefficients * torch.where(coefficients != 0, per_token, 0.0)).sum(), per_token, entropy


class TokenScores(NamedTuple):
    """Per-token scores from :func:`score_tokens`, each [N] and detached (None when not requested)."""

    student_entropy: torch.Tensor
    divergence: torch.Tensor
    forward_kl: torch.Tensor | None = None
    student_mass: torch.Tensor | None = None
    teacher_mass: torch.Tensor | None = None


@torch.no_grad()
def score_tokens(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    teacher_softcap: float | None = None,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
    with_forward_kl: bool = False,
    **divergence_kwargs,
) -> TokenScores:
    """No-grad chunked scoring pass for token selection (TIP) before the gradient pass.

    Returns :class:`TokenScores`: student entropy at the distillation temperature over the full vocabulary,
    the loss's per-token divergence (same options as the loss), optionally the forward KL(p_T ‖ p_S) with
    the same temperature / support / clip (TIP's Q3 selector ranks by it), and, when top_k is set, the
    unrenormalised support masses of both sides (methods.md §0.5 logging). Arguments as in
    :func:`chunked_token_divergence`.
    """
    student, teacher, options = _prepare_chunked(
        student_hidden,
        student_head,
        student_bias,
        softcap,
        teacher_hidden,
        teacher_head,
        teacher_bias,
        teacher_softcap,
        vocab_size,
        chunk_size,
        divergence_kwargs,
    )
    pieces = []
    for rows in _chunks(student_hidden.shape[0], chunk_size):
        student_logits = student.logits(student_hidden[rows])
        teacher_logits = teacher.logits(teacher_hidden[rows])
        pieces.append(_score_chunk(student_logits, teacher_logits, options, with_forward_kl))
    return TokenScores(*(None if field[0] is None else torch.cat(field) for field in zip(*pieces)))


def _full_vocabulary_scores(student_logits, teacher_logits, options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(student entropy, divergence) over the full vocabulary at T_d, as `entropy_from_logits` and
    `per_token_divergence` compute them, from one log-softmax per side."""
    _check_same_shape(student_logits, teacher_logits, "logits")
    dtype, temperature = _compute_dtype(student_logits), options["temperature"]
    log_p_s = (student_logits.to(dtype) / temperature).log_softmax(dim=-1)
    log_p_t = (teacher_logits.to(dtype) / temperature).log_softmax(dim=-1)
    entropy = _entropy_from_log_probs(log_p_s)
    divergence = _divergence_from_log_probs(
        log_p_s, log_p_t, options["divergence"], options["beta"], options["alpha"], options["clip"]
    )
    return entropy, divergence


def _score_chunk(student_logits, teacher_logits, options: dict, with_forward_kl: bool) -> TokenScores:
    forward_kl = student_mass = teacher_mass = None
    if with_forward_kl:
        forward_kl = per_token_divergence(
            student_logits, teacher_logits, **{**options, "divergence": "forward_kl"}
        )
    if options["top_k"] is not None:
        student_mass, teacher_mass = top_k_mass(
            student_logits,
            teacher_logits,
            top_k=options["top_k"],
            top_k_source=options["top_k_source"],
            temperature=options["temperature"],
        )
    if options["top_k"] is None:  # full vocabulary: one log-softmax per side serves the entropy and the divergence
        entropy, divergence = _full_vocabulary_scores(student_logits, teacher_logits, options)
    else:
        entropy = entropy_from_logits(student_logits, options["temperature"])
        divergence = per_token_divergence(student_logits, teacher_logits, **options)
    return TokenScores(
        student_entropy=entropy,
        divergence=divergence,
        forward_kl=forward_kl,
        student_mass=student_mass,
        teacher_mass=teacher_mass,
    )


# ---------------------------------------------------------------------------------------------------------
# Per-token passes over one LM head, chunk by chunk (sampled-token log-probs, entropy)
# ---------------------------------------------------------------------------------------------------------


def chunked_token_logprobs(
    hidden: torch.Tensor,
    head: OutputHead,
    token_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """log softmax(logits / T)[token] for each row of `hidden` [N, d] and `token_ids` [N] -> [N] (float32).

    Only `[chunk_size, V']` logits exist at a time; with gradients enabled each chunk is recomputed in backward.
    """

    def chunk_logprobs(chunk_hidden: torch.Tensor, chunk_ids: torch.Tensor) -> torch.Tensor:
        logits = head.logits(chunk_hidden).float() / temperature
        return torch.log_softmax(logits, dim=-1).gather(-1, chunk_ids.unsqueeze(-1)).squeeze(-1)

    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        chunk = (hidden[start : start + chunk_size], token_ids[start : start + chunk_size])
        if torch.is_grad_enabled() and hidden.requires_grad:
            pieces.append(checkpoint(chunk_logprobs, *chunk, use_reentrant=False))
        else:
            pieces.append(chunk_logprobs(*chunk))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


@torch.no_grad()
def chunked_entropy(
    hidden: torch.Tensor, head: OutputHead, *, temperature: float = 1.0, chunk_size: int = 1024
) -> torch.Tensor:
    """Entropy of softmax(logits / T) for each row of `hidden` [N, d] -> [N] float32, chunk by chunk, no gradient."""
    pieces = [
        entropy_from_logits(head.logits(hidden[start : start + chunk_size]).float(), temperature)
        for start in range(0, hidden.shape[0], chunk_size)
    ]
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
