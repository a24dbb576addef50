"""Tiny Qwen3- and Llama-style causal LMs for the testbed (random init, built from configs, no Hub).

Sizes measured to train on a 2-core CPU (``reference/testbed.md``): teacher 2 layers / hidden 96 /
4 heads (~300k parameters, reaches ~99% on the main task), student 2 / 64 / 2 (~130k parameters,
a weaker learner with a sharp accuracy phase transition). MLP width is 4x hidden, embeddings are
tied, attention is multi-head (as many key/value heads as query heads).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, Qwen3Config, Qwen3ForCausalLM

from trl_opd.testbed.tokenizers import TOKENIZER_KINDS

_ARCHITECTURES = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and tokenizer of a testbed model.

    Attributes:
        arch: "qwen3" or "llama".
        hidden: hidden size (must be divisible by ``heads``); the MLP is 4x as wide.
        layers: decoder layers.
        heads: attention heads (key/value heads = heads).
        tokenizer: "char" (one token per character), "bpe" (byte-level BPE trained on the task) or "bpe_words"
            (the same BPE with every digit and whitespace character isolated).
    """

    arch: str = "qwen3"
    hidden: int = 96
    layers: int = 2
    heads: int = 4
    tokenizer: str = "char"

    def __post_init__(self):
        if self.arch not in _ARCHITECTURES:
            raise ValueError(f"arch must be one of {sorted(_ARCHITECTURES)}, got {self.arch!r}.")
        if self.tokenizer not in TOKENIZER_KINDS:
            raise ValueError(f"tokenizer must be one of {TOKENIZER_KINDS}, got {self.tokenizer!r}.")
        if min(self.hidden, self.layers, self.heads) < 1:
            raise ValueError("hidden, layers and heads must all be >= 1.")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads}).")

    @classmethod
    def for_role(cls, role: str, **overrides) -> "ModelSpec":
        """The measured size for ``role`` ("teacher": 2/96/4, "student": 2/64/2), with ``overrides`` applied."""
        if role not in ROLE_SIZES:
            raise ValueError(f"role must be one of {sorted(ROLE_SIZES)}, got {role!r}.")
        return cls(**{**ROLE_SIZES[role], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


ROLE_SIZES = {
    "teacher": {"hidden": 96, "layers": 2, "heads": 4},
    "student": {"hidden": 64, "layers": 2, "heads": 2},
}


def tiny_config(
    tokenizer,
    role: str = "teacher",
    arch: str = "qwen3",
    hidden: int | None = None,
    layers: int | None = None,
    heads: int | None = None,
) -> PretrainedConfig:
    """A ``Qwen3Config`` / ``LlamaConfig`` for ``tokenizer``'s vocabulary at ``role``'s size (explicit sizes win)."""
    overrides = {k: v for k, v in {"hidden": hidden, "layers": layers, "heads": heads}.items() if v is not None}
    return config_from_spec(ModelSpec.for_role(role, arch=arch, **overrides), tokenizer)


def config_from_spec(spec: ModelSpec, tokenizer) -> PretrainedConfig:
    """The transformers config of ``spec`` for ``tokenizer`` (vocabulary size and special token ids)."""
    config_cls, _ = _ARCHITECTURES[spec.arch]
    return config_cls(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=4 * spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        head_dim=spec.hidden // spec.heads,
        max_position_embeddings=tokenizer.model_max_length,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _model_class(config: PretrainedConfig):
    for config_cls, model_cls in _ARCHITECTURES.values():
        if isinstance(config, config_cls):
            return model_cls
    raise ValueError(f"config must be a Qwen3Config or LlamaConfig, got {type(config).__name__}.")


def tiny_model(tokenizer, config: PretrainedConfig | None = None, seed: int = 0, **config_kwargs):
    """A randomly initialised causal LM for ``config`` (default ``tiny_config(tokenizer, **config_kwargs)``).

    The generation config gets the tokenizer's EOS and pad ids (TRL reads EOS from it) and no BOS.
    """
    if config is None:
        config = tiny_config(tokenizer, **config_kwargs)
    elif config_kwargs:
        raise ValueError("Pass either config or tiny_config keyword arguments, not both.")
    torch.manual_seed(seed)
    model = _model_class(config)(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model
