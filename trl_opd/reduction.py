"""Loss reductions over "units", written once (methods.md §0.7).

A unit is what carries one loss value ℓ_u: a completion token for OPD, an aligned segment for SimCT. Each unit
belongs to one row b_u of the micro-batch and stands for n_u of that row's student tokens (a token: 1, or 0 when
it is padding; a SimCT segment: its s1 − s0 re-tokenised student tokens). With w_u ≥ 0 the unit weights (default
1) and L_b the supervised student tokens of row b, the micro-batch loss is Σ_u c_u ℓ_u with

* `token_mean`:             c_u = w_u [n_u > 0] / N,  N = num_items (default Σ_b L_b);
* `token_mean_microbatch`:  c_u = w_u [n_u > 0] / max(Σ_b L_b, 1)  (the OPSD reference code);
* `sequence_mean`:          c_u = w_u [n_u > 0] / (L_{b_u} · S),  S = num_sequences (default #rows with L_b ≥ 1);
* `weighted_mean`:          c_u = w_u [n_u > 0] / Σ_u w_u n_u  (TIP Eq. 9; `num_items` replaces the sum, e.g. by
  its cross-process value); all-zero weights give all-zero coefficients.

`step_coefficients` adds the trainer's step policy on top: which normaliser each reduction takes during training
(the step's generated tokens or sequences per process, the cross-process Σ w·n) and the division of micro-batch
means over the gradient-accumulation window, so that the sum over micro-batches and processes is the step's mean.
`losses.token_loss_coefficients` and `cross_tokenizer.segment_loss_coefficients` are this function on tokens and
on segments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

REDUCTIONS = ("token_mean", "token_mean_microbatch", "sequence_mean", "weighted_mean")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; choose one of {REDUCTIONS}.")


@torch.no_grad()
def unit_coefficients(
    reduction: str,
    unit_rows: torch.Tensor,
    unit_tokens: torch.Tensor,
    row_tokens: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    num_items=None,
    num_sequences=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Detached `[U]` coefficients c with loss = Σ_u c_u ℓ_u (see the module docstring).

    Args:
        reduction: one of `REDUCTIONS`.
        unit_rows: `[U]` int64 row of each unit.
        unit_tokens: `[U]` student tokens each unit stands for (0: a padding unit, coefficient 0).
        row_tokens: `[B]` supervised student tokens of each row (L_b).
        weights: optional `[U]` non-negative weights.
        num_items / num_sequences: the normalisers N and S, overriding the micro-batch defaults.
    """
    check_reduction(reduction)
    device = unit_tokens.device
    tokens = unit_tokens.to(dtype)
    counted = (tokens > 0).to(dtype)
    numerator = counted if weights is None else counted * weights.detach().to(dtype)
    row_tokens = row_tokens.to(device=device, dtype=dtype)
    if reduction == "token_mean":
        denominator = row_tokens.sum().clamp(min=1) if num_items is None else num_items
        return numerator / torch.as_tensor(denominator, dtype=dtype, device=device)
    if reduction == "token_mean_microbatch":
        return numerator / row_tokens.sum().clamp(min=1)
    if reduction == "weighted_mean":
        total = (numerator * tokens).sum() if num_items is None else num_items
        total = torch.as_tensor(total, dtype=dtype, device=device)
        return numerator / total if bool(total > 0) else torch.zeros_like(numerator)
    if num_sequences is None:
        num_sequences = (row_tokens > 0).sum().clamp(min=1)
    num_sequences = torch.as_tensor(num_sequences, dtype=dtype, device=device)
    return numerator / (row_tokens[unit_rows].clamp(min=1) * num_sequences)


@dataclass(frozen=True)
class StepNormalisers:
    """What the trainer knows beyond one micro-batch, for `step_coefficients`.

    Attributes:
        training: training micro-batch (else evaluation: micro-batch normalisers, no accumulation scaling).
        num_items: the step's generated tokens per process (TRL's `num_items_in_batch`), for `token_mean`.
        num_sequences: the step's sequences with a supervised token, per process, for `sequence_mean` (training).
        mean_over_processes: x ↦ (Σ over processes of x) / num_processes, for `weighted_mean` (training); None on
            one process means x itself.
        accumulation_steps: micro-batches per optimizer step; micro-batch means are divided by it in training.
    """

    training: bool = False
    num_items: torch.Tensor | float | None = None
    num_sequences: torch.Tensor | float | None = None
    mean_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None
    accumulation_steps: int = 1


def step_coefficients(
    reduction: str,
    unit_rows: torch.Tensor,
    unit_tokens: torch.Tensor,
    row_tokens: torch.Tensor,
    weights: torch.Tensor | None,
    normalisers: StepNormalisers,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`unit_coefficients` with the step's normalisers: the sum over the step's micro-batches and processes is

    * `token_mean`: Σ w ℓ / (the step's generated tokens), exact under gradient accumulation and DDP averaging;
    * `sequence_mean`: in training the mean over the step's sequences; in evaluation over this micro-batch's;
    * `weighted_mean`: in training Σ w ℓ / Σ w n over every process at this micro-step (DDP's average of the
      gradients then equals the mean over every selected unit, not the mean of per-process means), averaged over
      the accumulation window;
    * `token_mean_microbatch`: the micro-batch mean, averaged over the accumulation window.
    """
    arguments = (reduction, unit_rows, unit_tokens, row_tokens, weights)
    training = normalisers.training
    if reduction == "token_mean":
        return unit_coefficients(*arguments, num_items=normalisers.num_items, dtype=dtype)
    if reduction == "sequence_mean":
        num_sequences = normalisers.num_sequences if training else None
        return unit_coefficients(*arguments, num_sequences=num_sequences, dtype=dtype)
    num_items = None
    if reduction == "weighted_mean" and training and normalisers.mean_over_processes is not None:
        tokens = unit_tokens.to(dtype)  # non-negative: padding units count 0
        local = tokens.sum() if weights is None else (tokens * weights.detach().to(dtype)).sum()
        num_items = normalisers.mean_over_processes(local)
    coefficients = unit_coefficients(*arguments, num_items=num_items, dtype=dtype)
    return coefficients / normalisers.accumulation_steps if training else coefficients


def token_units(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A `[B, T]` token mask as units: (rows `[B·T]`, tokens `[B·T]` = the mask, row tokens `[B]`)."""
    mask = mask.detach()
    rows = torch.arange(mask.shape[0], device=mask.device).repeat_interleave(mask.shape[1])
    return rows, mask.reshape(-1), mask.sum(dim=1)


def segment_units(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCT segments `[G, 5]` (b, s0, s1, t0, t1) as units: (rows `[G]`, student tokens `[G]`)."""
    return segments[:, 0], segments[:, 2] - segments[:, 1]


def combine_factors(factors: list[torch.Tensor]) -> torch.Tensor | None:
    """The product of the enabled weight factors (float32), or None when there is none (uniform weights)."""
    if not factors:
        return None
    weights = factors[0].float()
    for factor in factors[1:]:
        weights = weights * factor
    return weights
