"""What the chunked losses need to know about a model's output layer, and sampled-token log-probs from it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


@dataclass
class OutputHead:
    """The pieces of a causal LM's output layer: logits = softcap(scale · (h Wᵀ + b)).

    `scale` covers the architectures that rescale logits (Cohere `logit_scale`, Falcon-H1 `lm_head_multiplier`,
    Granite/MiniCPM3 `1/logits_scaling`, ...); `softcap` is Gemma-2's `final_logit_softcapping`.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    softcap: float | None

    def scaled_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Fold the logit scale into the hidden states (h·s)Wᵀ = s·(hWᵀ), so the loss kernels need no scale argument.

        Exact when there is no bias; with a bias the scale would also multiply b, so we refuse that combination.
        """
        if self.scale == 1.0:
            return hidden
        if self.bias is not None:
            raise ValueError("A logit scale together with an lm_head bias is not supported by trl_opd's loss kernels.")
        return hidden * self.scale


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


def output_head(unwrapped_model) -> OutputHead:
    """Read the output layer of an (unwrapped, possibly PEFT) causal LM."""
    head = unwrapped_model.get_output_embeddings()
    config = unwrapped_model.config.get_text_config()
    return OutputHead(
        weight=head.weight,
        bias=getattr(head, "bias", None),
        scale=_logit_scale(config),
        softcap=getattr(config, "final_logit_softcapping", None),
    )


def head_logits(hidden: torch.Tensor, head: OutputHead, vocab_size: int | None = None) -> torch.Tensor:
    """Float32 logits of `hidden` [N, d] through `head`, sliced to the first `vocab_size` entries when given."""
    weight, bias = head.weight, head.bias
    if vocab_size is not None:
        weight = weight[:vocab_size]
        bias = None if bias is None else bias[:vocab_size]
    logits = torch.nn.functional.linear(head.scaled_hidden(hidden), weight, bias).float()
    if head.softcap is not None:
        logits = head.softcap * torch.tanh(logits / head.softcap)
    return logits


def chunked_token_logprobs(
    hidden: torch.Tensor,
    head: OutputHead,
    token_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """log softmax(logits / T)[token] for each row of `hidden` [N, d] and `token_ids` [N] -> [N] (float32).

    Only `[chunk_size, V]` logits exist at a time; with gradients enabled each chunk is recomputed in backward.
    """

    def chunk_logprobs(chunk_hidden: torch.Tensor, chunk_ids: torch.Tensor) -> torch.Tensor:
        logits = head_logits(chunk_hidden, head, vocab_size) / temperature
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
