"""Read a causal LM's output layer into the package's one head type, `losses.OutputHead`."""

from __future__ import annotations

import torch

from ..losses import OutputHead


def _whole(tensor):
    """A head sharded by FSDP2 (a DTensor) gathered whole: one all-gather per call, whose backward reduce-scatters the
    gradient to the shards (as TRL's DistillationTrainer does). The trainers read a head once per micro-batch, so
    every pass over it (TIP scoring, loss, diagnostics, sampled-token log-probs) shares that one gather."""
    if tensor is not None and isinstance(tensor, torch.distributed.tensor.DTensor):
        return tensor.full_tensor()
    return tensor


def _logit_scale(config) -> float:
    """The multiplier an architecture applies to its logits before softcapping (1.0 for most models)."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    logits_scaling = getattr(config, "logits_scaling", None)
    if logits_scaling is not None:
        return float(logits_scaling) if config.model_type == "hyperclovax" else 1.0 / float(logits_scaling)
    return 1.0


def output_head(unwrapped_model, vocab_size: int | None = None) -> OutputHead:
    """The output layer of an (unwrapped, possibly PEFT, possibly FSDP2-sharded) causal LM, keeping the first
    `vocab_size` logits if given."""
    head = unwrapped_model.get_output_embeddings()
    config = unwrapped_model.config.get_text_config()
    return OutputHead(
        weight=_whole(head.weight),
        bias=_whole(getattr(head, "bias", None)),
        softcap=getattr(config, "final_logit_softcapping", None),
        scale=_logit_scale(config),
        vocab_size=vocab_size,
    )
