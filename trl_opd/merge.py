"""MonoSoup: a data-free single-checkpoint soup of a fine-tuned (distilled) model (methods.md §12).

For each weight matrix, the update ΔW = W_1 − W_0 from the base W_0 to the tuned W_1 is split by SVD into
its k leading directions ΔW_high and the remainder ΔW_low, and the two parts are re-mixed per layer from
the spectrum alone:

    ΔW = U Σ Vᵀ,  σ_1 ≥ … ≥ σ_r
    k:  mode "erank":  p_i = σ_i / Σ_j σ_j,  H = −Σ p_i log(p_i + ε),  k = clamp(⌈exp H⌉, 1, r)
        mode "energy": k = min{k : Σ_{i≤k} σ_i² / Σ_i σ_i² ≥ R}              (R = ``energy``)
    P_k = Σ_{i≤k} σ_i² / Σ_i σ_i²,   ρ = (σ_{k+1} / (σ_1 + ε))²  (0 when k = r),   cos α = √(1 − P_k)
    λ_low = clamp(ρ + (1 − ρ) cos α, 0, 1),   λ_high = 1 − λ_low
    W_mono = W_0 + λ_high ΔW_high + λ_low ΔW_low                                  ε = 1e-12

Tensors with fewer than two dimensions (biases, norms), non-floating tensors, tensors whose relative update
‖ΔW‖_F / (‖W_0‖_F + ε) is below 1e-6, and updates with zero energy keep W_1. Convolution kernels are
flattened to [out, in·k_h·k_w]. The SVD runs in fp32 (fp64 for fp64 weights) and the result is cast back to
the tuned tensor's dtype. LoRA students must be merged into their base weights first.

Command line: ``python -m trl_opd.merge BASE TUNED OUT [--mode erank|energy] [--energy 0.8]``.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import math
import os
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

MONOSOUP_MODES = ("erank", "energy")
# The authors' code calls the energy criterion "variance" (methods.md §12.1).
_MODE_ALIASES = {"variance": "energy"}
MIN_RELATIVE_UPDATE = 1e-6
EPS = 1e-12


def _resolve_mode(mode: str) -> str:
    mode = _MODE_ALIASES.get(mode, mode)
    if mode not in MONOSOUP_MODES:
        raise ValueError(f"mode={mode!r} is not supported; use 'erank' (effective rank) or 'energy'.")
    return mode


def _check_energy(energy: float) -> None:
    if not (isinstance(energy, (int, float)) and 0.0 < energy <= 1.0):
        raise ValueError(
            f"energy must be in (0, 1] (the share of the update's energy kept in ΔW_high), got {energy!r}."
        )


def _kept_rank(singular_values: Tensor, mode: str, energy: float) -> int:
    """k of §12.1: how many leading singular directions form ΔW_high (1 ≤ k ≤ r)."""
    rank = singular_values.numel()
    if mode == "erank":
        shares = singular_values / singular_values.sum()
        entropy = -(shares * torch.log(shares + EPS)).sum().item()
        kept = math.ceil(math.exp(entropy))
    else:
        squared = singular_values.square()
        captured = torch.cumsum(squared, dim=0) / squared.sum()
        kept = int((captured < energy).sum().item()) + 1
    return min(max(kept, 1), rank)


def _low_energy_coefficient(singular_values: Tensor, kept: int) -> float:
    """λ_low of §12.1 from the spectrum and the kept rank k."""
    squared = singular_values.square()
    captured = (squared[:kept].sum() / squared.sum()).item()
    if kept < singular_values.numel():
        decay = (singular_values[kept] / (singular_values[0] + EPS)).item() ** 2
    else:
        decay = 0.0
    cos_alpha = math.sqrt(max(1.0 - captured, 0.0))
    return min(max(decay + (1.0 - decay) * cos_alpha, 0.0), 1.0)


def monosoup_tensor(
    base_weight: Tensor, tuned_weight: Tensor, *, mode: str = "erank", energy: float = 0.8
) -> Tensor:
    """MonoSoup of one parameter tensor (see the module docstring); returns a tensor like ``tuned_weight``.

    ``tuned_weight`` itself is returned where §12.1 keeps W_1 (fewer than 2 dims, not floating point, a
    negligible or zero-energy update).
    """
    mode = _resolve_mode(mode)
    _check_energy(energy)
    if base_weight.shape != tuned_weight.shape:
        raise ValueError(
            f"base shape {tuple(base_weight.shape)} differs from tuned shape {tuple(tuned_weight.shape)}."
        )
    if tuned_weight.dim() < 2 or not tuned_weight.is_floating_point():
        return tuned_weight
    compute_dtype = torch.float64 if tuned_weight.dtype == torch.float64 else torch.float32
    base = base_weight.detach().to(device=tuned_weight.device, dtype=compute_dtype)
    update = tuned_weight.detach().to(compute_dtype) - base
    if torch.linalg.norm(update) / (torch.linalg.norm(base) + EPS) < MIN_RELATIVE_UPDATE:
        return tuned_weight
    matrix = update.reshape(update.shape[0], -1)
    left, singular_values, right = torch.linalg.svd(matrix, full_matrices=False)
    if singular_values.square().sum() <= EPS:
        return tuned_weight
    kept = _kept_rank(singular_values, mode, energy)
    low_coefficient = _low_energy_coefficient(singular_values, kept)
    high_part = (left[:, :kept] * singular_values[:kept]) @ right[:kept]
    low_part = matrix - high_part
    edited = (1.0 - low_coefficient) * high_part + low_coefficient * low_part
    return (base + edited.reshape(update.shape)).to(tuned_weight.dtype)


def _check_same_layout(base_state_dict: Mapping[str, Tensor], tuned_state_dict: Mapping[str, Tensor]) -> None:
    only_tuned = sorted(set(tuned_state_dict) - set(base_state_dict))
    only_base = sorted(set(base_state_dict) - set(tuned_state_dict))
    if only_tuned or only_base:
        raise ValueError(
            "base and tuned state dicts have different parameter names "
            f"(only in tuned: {only_tuned[:5]}{' ...' if len(only_tuned) > 5 else ''}; "
            f"only in base: {only_base[:5]}{' ...' if len(only_base) > 5 else ''}). MonoSoup needs two "
            "checkpoints of the same architecture; merge LoRA adapters into the model first."
        )
    mismatched = [
        f"{name}: base {tuple(base_state_dict[name].shape)} vs tuned {tuple(tensor.shape)}"
        for name, tensor in tuned_state_dict.items()
        if base_state_dict[name].shape != tensor.shape
    ]
    if mismatched:
        raise ValueError(
            "base and tuned parameters differ in shape (" + "; ".join(mismatched[:5]) + "). "
            "MonoSoup needs the tuned model to be a fine-tune of exactly this base model."
        )


def _storage_key(base_weight: Tensor, tuned_weight: Tensor) -> tuple:
    """Identifies a (base, tuned) pair by memory, so tied weights (embeddings = lm_head) are edited once."""
    return (base_weight.data_ptr(), tuned_weight.data_ptr(), tuple(tuned_weight.shape), tuned_weight.dtype)


def monosoup(
    base_state_dict: Mapping[str, Tensor],
    tuned_state_dict: Mapping[str, Tensor],
    *,
    mode: str = "erank",
    energy: float = 0.8,
    exclude: Iterable[str] = (),
) -> dict[str, Tensor]:
    """MonoSoup of a whole checkpoint (methods.md §12): the formulas are in the module docstring.

    Args:
        base_state_dict: W_0, e.g. the student before OPD.
        tuned_state_dict: W_1, e.g. the student after OPD; same names and shapes as the base.
        mode: ``"erank"`` (entropy-based effective rank, the paper's hyperparameter-free default) or
            ``"energy"`` (smallest k holding the share ``energy`` of Σσ²; the authors' code calls it
            ``"variance"``, which is accepted too).
        energy: R ∈ (0, 1], used by ``mode="energy"`` only.
        exclude: ``fnmatch`` patterns of parameter names that keep W_1 (e.g. ``"*embed_tokens*"``).

    Returns:
        A new state dict (tuned order and dtypes). Parameters sharing memory in the inputs (tied
        embeddings) are edited once and share the result.
    """
    mode = _resolve_mode(mode)
    _check_energy(energy)
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    _check_same_layout(base_state_dict, tuned_state_dict)
    merged: dict[str, Tensor] = {}
    edited_by_storage: dict[tuple, Tensor] = {}
    for name, tuned_weight in tuned_state_dict.items():
        base_weight = base_state_dict[name]
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            merged[name] = tuned_weight
            continue
        key = _storage_key(base_weight, tuned_weight)
        if key not in edited_by_storage:
            edited_by_storage[key] = monosoup_tensor(base_weight, tuned_weight, mode=mode, energy=energy)
        merged[name] = edited_by_storage[key]
    return merged


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------


# A local model directory holds a tokenizer only if one of these exists. (AutoTokenizer does not tell: on a
# directory with only config.json it can build an empty tokenizer of the model type instead of failing.)
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


def _has_tokenizer(directory: str) -> bool:
    if not os.path.isdir(directory):
        return True  # a Hub id: let AutoTokenizer decide
    return any(os.path.exists(os.path.join(directory, name)) for name in _TOKENIZER_FILES)


def _save_tokenizer(out_dir: str, *candidate_dirs: str) -> None:
    """Copy the tokenizer of the first candidate directory that has one."""
    from transformers import AutoTokenizer

    for directory in candidate_dirs:
        if not _has_tokenizer(directory):
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError, TypeError, KeyError) as error:
            logger.info("no tokenizer loaded from %s (%s)", directory, error)
            continue
        tokenizer.save_pretrained(out_dir)
        return
    logger.warning(
        "neither %s has a tokenizer; %s holds only the model.", " nor ".join(candidate_dirs), out_dir
    )


def merge_checkpoints(
    base_dir: str, tuned_dir: str, out_dir: str, *, mode: str = "erank", energy: float = 0.8, exclude=()
) -> str:
    """Load two causal-LM directories, write their MonoSoup to ``out_dir`` (safetensors) with the tokenizer
    of ``tuned_dir`` (or of ``base_dir`` when the tuned directory has none). Returns ``out_dir``."""
    mode = _resolve_mode(mode)
    _check_energy(energy)
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    tuned_model = AutoModelForCausalLM.from_pretrained(tuned_dir, dtype="auto")
    merged = monosoup(
        base_model.state_dict(), tuned_model.state_dict(), mode=mode, energy=energy, exclude=exclude
    )
    del base_model
    tuned_model.load_state_dict(merged)
    tuned_model.save_pretrained(out_dir)
    _save_tokenizer(out_dir, tuned_dir, base_dir)
    return out_dir


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="trl-opd-merge",
        description="MonoSoup (arXiv 2602.09689): a data-free re-weighting of a fine-tuned checkpoint's "
        "update, per layer, from its singular values.",
    )
    parser.add_argument("base", help="directory of the model before tuning (W_0)")
    parser.add_argument("tuned", help="directory of the tuned model (W_1), same architecture")
    parser.add_argument("out", help="output directory (safetensors weights + tokenizer)")
    parser.add_argument("--mode", default="erank", choices=[*MONOSOUP_MODES, *_MODE_ALIASES])
    parser.add_argument("--energy", type=float, default=0.8, help="R for --mode energy (default 0.8)")
    parser.add_argument(
        "--exclude",
        nargs="*",
        default=[],
        metavar="PATTERN",
        help="fnmatch patterns of parameters left as tuned",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m trl_opd.merge`` and ``trl-opd-merge``."""
    args = _parse_args(argv)
    try:
        _check_energy(args.energy)
    except ValueError as error:
        raise SystemExit(f"trl-opd-merge: {error}") from error
    try:
        merge_checkpoints(
            args.base, args.tuned, args.out, mode=args.mode, energy=args.energy, exclude=args.exclude
        )
    except ValueError as error:  # e.g. a tuned model that is not a fine-tune of this base: the message says why
        raise SystemExit(f"trl-opd-merge: {error}") from error
    print(f"MonoSoup ({args.mode}) of {args.tuned} over {args.base} written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
