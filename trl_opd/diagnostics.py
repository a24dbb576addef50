"""OPD dynamics diagnostics (methods.md §7, arXiv 2604.13016): pure, chunked, without autograd.

On student rollouts, with p_S,t and p_T,t the student / teacher next-token distributions at temperature
T_d, S^S_t = TopK(p_S,t, k), S^T_t = TopK(p_T,t, k) and I_t = S^S_t ∩ S^T_t:

========================  ================================================================================
``overlap_ratio``         E_t[ |I_t| / k ]
``student_overlap_mass``  E_t[ Σ_{v∈I_t} p_S,t(v) ]   (raw, not renormalised)
``teacher_overlap_mass``  E_t[ Σ_{v∈I_t} p_T,t(v) ]
``entropy_gap``           E_t[ |H(p_T,t) − H(p_S,t)| ]
``overlap_advantage``     E_t[ (1/|I_t|) Σ_{v∈I_t} p̄_S(v) (log p̄_T(v) − log p̄_S(v)) ], p̄ renormalised
                          over I_t; positions with an empty I_t are skipped (they count in no denominator)
``overlap_advantage_``    Σ_t Σ_{v∈I_t} (log p_T,t(v) − log p_S,t(v)) / Σ_t |I_t|: the authors' code's form, the
``pooled``                pooled mean of the raw (full-vocabulary) log-ratio over every entry of every intersection
========================  ================================================================================

The two advantages differ on purpose (methods.md §7.1): ours is the per-position renormalised expectation the paper's
text describes, the pooled one is what the released code computes and plots; log both to compare with the paper's
curves.

E_t averages over the valid (mask != 0) positions. Logits are processed a chunk of positions at a time, so
at most one chunk's [n, V] softmax exists at once. Top-k ties follow ``torch.topk``.

:func:`plot_diagnostics` turns a Trainer's ``state.log_history`` into PNG curves (matplotlib, optional).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .losses import _entropy_from_log_probs

OVERLAP_KEYS = (
    "overlap_ratio",
    "student_overlap_mass",
    "teacher_overlap_mass",
    "entropy_gap",
    "overlap_advantage",
    "overlap_advantage_pooled",
)
DIAGNOSTICS_PREFIX = "diagnostics/"
# TIP's quadrant shares: logged once, under TIP's own names, by TIP's scoring pass or (TIP off) the diagnostics pass.
QUADRANT_KEYS = tuple(f"tip/q{quadrant}_share" for quadrant in range(1, 5))

# Layout of OverlapAccumulator.totals: per-position sums, plus the counts that divide them.
_TOTALS = ("num_tokens", *OVERLAP_KEYS, "num_overlapping_tokens", "num_overlap_entries")
# The denominator of each average (the others divide by num_tokens).
_DENOMINATORS = {"overlap_advantage": "num_overlapping_tokens", "overlap_advantage_pooled": "num_overlap_entries"}
_INDEX = {name: index for index, name in enumerate(_TOTALS)}


def _renormalised_log_probs(log_probs: Tensor, in_set: Tensor) -> Tensor:
    """log p̄ over the entries where ``in_set`` is True (−inf elsewhere; NaN on rows with an empty set)."""
    restricted = log_probs.masked_fill(~in_set, -math.inf)
    return restricted - torch.logsumexp(restricted, dim=-1, keepdim=True)


def _overlap_sums(student_logits: Tensor, teacher_logits: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor]:
    """Sums over positions of every diagnostic, laid out as ``_TOTALS``, and the student entropies [n];
    logits [n, V] of valid positions."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student_log_probs = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher_log_probs = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    student_entropy = _entropy_from_log_probs(student_log_probs)
    entropy_gap = (_entropy_from_log_probs(teacher_log_probs) - student_entropy).abs()

    student_top = student_log_probs.topk(k, dim=-1).indices
    teacher_top = teacher_log_probs.topk(k, dim=-1).indices
    # in_overlap[n, j]: the student's j-th top-k token is also in the teacher's top k, i.e. it belongs to I_t.
    in_overlap = (student_top.unsqueeze(-1) == teacher_top.unsqueeze(-2)).any(dim=-1)
    overlap_size = in_overlap.sum(dim=-1)
    student_on_top = student_log_probs.gather(-1, student_top)
    teacher_on_top = teacher_log_probs.gather(-1, student_top)

    student_bar = _renormalised_log_probs(student_on_top, in_overlap)
    teacher_bar = _renormalised_log_probs(teacher_on_top, in_overlap)
    zeros = torch.zeros_like(student_bar)
    terms = torch.where(in_overlap, student_bar.exp() * (teacher_bar - student_bar), zeros).sum(dim=-1)
    overlapping = overlap_size > 0
    advantage = torch.where(overlapping, terms / overlap_size.clamp_min(1), torch.zeros_like(terms))
    raw_log_ratio = torch.where(in_overlap, teacher_on_top - student_on_top, zeros).sum()

    sums = [
        float(student_logits.shape[0]),
        (overlap_size.to(dtype) / k).sum(),
        (student_on_top.exp() * in_overlap).sum(),
        (teacher_on_top.exp() * in_overlap).sum(),
        entropy_gap.sum(),
        advantage.sum(),
        raw_log_ratio,
        overlapping.sum(),
        overlap_size.sum(),
    ]
    device = student_logits.device
    return torch.stack([torch.as_tensor(value, dtype=torch.float64, device=device) for value in sums]), student_entropy


def _check_overlap_settings(k: int, temperature: float) -> None:
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be a positive integer (the top-k size), got {k!r}.")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0 (the distillation temperature T_d), got {temperature!r}.")


def _check_logits(student_logits: Tensor, teacher_logits: Tensor, k: int) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must have the same shape [..., V]; slice both to the shared vocabulary first."
        )
    if student_logits.dim() < 1 or k > student_logits.shape[-1]:
        raise ValueError(f"k={k} exceeds the vocabulary size {student_logits.shape[-1:]}; lower k.")


class OverlapAccumulator:
    """Accumulates the §7.1 diagnostics over logits fed one chunk at a time.

    Usage::

        accumulator = OverlapAccumulator(k=16, temperature=1.0)
        for student_chunk, teacher_chunk, mask_chunk in chunks:      # [..., V], [..., V], [...]
            accumulator.update(student_chunk, teacher_chunk, mask_chunk)
        stats = accumulator.compute()

    ``totals`` is a float64 tensor of per-position sums (None before the first update); summing it over
    ranks (``all_reduce``) before :meth:`compute` gives the statistics of the union of the ranks' tokens.
    """

    def __init__(self, *, k: int = 16, temperature: float = 1.0):
        _check_overlap_settings(k, temperature)
        self.k = k
        self.temperature = float(temperature)
        self.totals: Tensor | None = None

    def reset(self) -> None:
        self.totals = None

    @torch.no_grad()
    def update(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
        """Add a chunk: logits [..., V] (same shape), ``mask`` [...] (non-zero = valid; None = all valid).

        Returns the student's entropy H(p_S,t) at the chunk's valid positions, flattened in order ([n]), so a
        caller that also needs it (OPDTrainer's TIP quadrant shares) does not compute it twice.
        """
        _check_logits(student_logits, teacher_logits, self.k)
        if mask is not None and mask.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"mask {tuple(mask.shape)} must have the logits' leading shape "
                f"{tuple(student_logits.shape[:-1])}."
            )
        vocab = student_logits.shape[-1]
        student_logits = student_logits.detach().reshape(-1, vocab)
        teacher_logits = teacher_logits.detach().reshape(-1, vocab)
        if mask is not None:
            keep = mask.reshape(-1) != 0
            student_logits, teacher_logits = student_logits[keep], teacher_logits[keep]
        if student_logits.shape[0] == 0:
            return student_logits.new_zeros(0, dtype=torch.promote_types(student_logits.dtype, torch.float32))
        sums, student_entropy = _overlap_sums(student_logits, teacher_logits, self.k, self.temperature)
        self.totals = sums if self.totals is None else self.totals + sums.to(self.totals.device)
        return student_entropy

    def sums_and_counts(self, device=None) -> dict[str, tuple[Tensor, Tensor]]:
        """{key: (sum, count)} float64 tensors of the averages: ``compute()[key]`` is sum / count.

        Summing both over processes (``gather`` then ``sum``) before dividing gives the statistics of the union of
        the processes' tokens; the pairs exist (zeros) even when nothing was fed, so every process sends the same.
        """
        totals = self.totals
        if totals is None:
            totals = torch.zeros(len(_TOTALS), dtype=torch.float64, device=device)
        elif device is not None:
            totals = totals.to(device)
        return {
            key: (totals[_INDEX[key]], totals[_INDEX[_DENOMINATORS.get(key, "num_tokens")]]) for key in OVERLAP_KEYS
        }

    def compute(self) -> dict[str, float]:
        """The §7.1 averages (NaN where nothing was counted) and ``num_tokens`` (an int)."""
        totals = [0.0] * len(_TOTALS) if self.totals is None else self.totals.tolist()
        stats = {}
        for key in OVERLAP_KEYS:
            denominator = totals[_INDEX[_DENOMINATORS.get(key, "num_tokens")]]
            stats[key] = totals[_INDEX[key]] / denominator if denominator > 0 else math.nan
        stats["num_tokens"] = int(round(totals[_INDEX["num_tokens"]]))
        return stats


def overlap_stats(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    k: int = 16,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Top-k overlap diagnostics of methods.md §7.1 over the valid positions of a batch.

    Args:
        student_logits, teacher_logits: [B, T, V] logits at the completion positions (same vocabulary).
        mask: [B, T] supervised tokens (non-zero = valid).
        k: top-k size (the paper's default 16). temperature: T_d, applied to both sides.
        chunk_size: positions per chunk; only one chunk of logits is copied and soft-maxed at a time.

    Returns:
        ``overlap_ratio``, ``student_overlap_mass``, ``teacher_overlap_mass``, ``entropy_gap``,
        ``overlap_advantage``, ``overlap_advantage_pooled`` (floats; NaN when there is nothing to average) and
        ``num_tokens`` (int).
    """
    _check_overlap_settings(k, temperature)
    _check_logits(student_logits, teacher_logits, k)
    if student_logits.dim() != 3 or mask.shape != student_logits.shape[:2]:
        raise ValueError(
            f"expected logits [B, T, V] and mask [B, T], got logits {tuple(student_logits.shape)} "
            f"and mask {tuple(mask.shape)}."
        )
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    accumulator = OverlapAccumulator(k=k, temperature=temperature)
    rows, columns = (mask != 0).nonzero(as_tuple=True)
    for start in range(0, rows.numel(), chunk_size):
        chunk_rows, chunk_columns = rows[start : start + chunk_size], columns[start : start + chunk_size]
        accumulator.update(
            student_logits[chunk_rows, chunk_columns], teacher_logits[chunk_rows, chunk_columns]
        )
    return accumulator.compute()


# --------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------


def _is_diagnostic_key(key: str) -> bool:
    return key.startswith(DIAGNOSTICS_PREFIX) or key in QUADRANT_KEYS or key.rsplit("/", 1)[-1] in OVERLAP_KEYS


def _diagnostic_series(log_history: Sequence[Mapping]) -> dict[str, tuple[list, list]]:
    """{key: (steps, values)} for every numeric diagnostic entry; the step is the entry's "step" or index."""
    series: dict[str, tuple[list, list]] = {}
    for index, entry in enumerate(log_history):
        if not isinstance(entry, Mapping):
            raise ValueError(
                f"log_history[{index}] is a {type(entry).__name__}; expected a dict of logged values."
            )
        step = entry.get("step", index)
        for key, value in entry.items():
            if _is_diagnostic_key(key) and isinstance(value, (int, float)) and not isinstance(value, bool):
                steps, values = series.setdefault(key, ([], []))
                steps.append(step)
                values.append(float(value))
    return series


def _png_names(keys: list[str]) -> dict[str, str]:
    """A distinct, filesystem-safe file name per key.

    ("diagnostics/overlap_ratio" → "diagnostics_overlap_ratio.png")
    """
    names, used = {}, set()
    for key in keys:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_") or "metric"
        name, suffix = stem, 2
        while name in used:
            name, suffix = f"{stem}_{suffix}", suffix + 1
        used.add(name)
        names[key] = f"{name}.png"
    return names


def plot_diagnostics(log_history: Sequence[Mapping], out_dir: str | os.PathLike) -> list[str]:
    """Write one PNG line plot per diagnostic in a Trainer's ``state.log_history``.

    Plotted keys: those starting with ``"diagnostics/"``, TIP's quadrant shares (:data:`QUADRANT_KEYS`) and those
    whose last ``/``-component is one of :data:`OVERLAP_KEYS` (e.g. ``"train/overlap_ratio"``). The x axis is the entry's ``"step"`` (or its
    index in the list). Needs matplotlib (``pip install 'trl_opd[plot]'``); pyplot and its global state
    are not used.

    Returns:
        The written paths, in sorted key order (empty when no diagnostic was logged).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "plot_diagnostics needs matplotlib: install it with `pip install 'trl_opd[plot]'` "
            "(or `pip install matplotlib`)."
        ) from error
    if isinstance(log_history, (str, bytes)) or not isinstance(log_history, Sequence):
        raise ValueError("log_history must be a list of dicts, e.g. trainer.state.log_history.")
    series = _diagnostic_series(log_history)
    os.makedirs(out_dir, exist_ok=True)
    names = _png_names(sorted(series))
    paths = []
    for key, name in names.items():
        steps, values = series[key]
        figure = Figure(figsize=(6, 4))
        axes = figure.add_subplot()
        axes.plot(steps, values, marker="o", markersize=3)
        axes.set(xlabel="step", ylabel=key, title=key)
        axes.grid(alpha=0.3)
        path = os.path.join(os.fspath(out_dir), name)
        figure.savefig(path, dpi=100, bbox_inches="tight")
        paths.append(path)
    return paths
