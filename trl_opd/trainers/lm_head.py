"""Read a causal LM's output layer into the package's one head type, `losses.OutputHead`."""

from __future__ import annotations

import torch

from ..losses import OutputHead


def _whole(tensor):
    """A head sharded by FSDP2 (a DTensor) gathered whole: one all-gather per call, whose backward reduce-scatters the
    gradient to the shards (as TRL's DistillationTrainer does). The trainers read a head once per micro-batch, so
    every pass over it (TIP scoring, loss, diagnostics, sampled-token log-probs) shares that one gather. A head
    partitioned by DeepSpeed ZeRO-3: see `_zero3_whole`."""
    if tensor is not None and isinstance(tensor, torch.distributed.tensor.DTensor):
        return tensor.full_tensor()
    if tensor is not None and hasattr(tensor, "ds_id"):
        return _zero3_whole(tensor)
    return tensor


def _zero3_whole(parameter):
    """A DeepSpeed ZeRO-3 parameter whole. Inside a forward that fetched it (the trained student's head, which
    `keep_head_whole_in_forward` registers with the student's root module) it is the parameter itself, so its
    gradient reaches the partitions through DeepSpeed's own hooks. Anywhere else (the frozen teacher's head after its
    forward released it, the diagnostics, the set-up checks of a model loaded partitioned by `zero3_init_flag`) a
    copy gathered once per call, outside autograd: the trainers read a trained head with gradients only inside the
    student's forward."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if parameter.ds_status == ZeroParamStatus.AVAILABLE:
        return parameter
    with deepspeed.zero.GatheredParameters([parameter]):
        return parameter.detach().clone()


def keep_head_whole_in_forward(model) -> None:
    """Under DeepSpeed ZeRO-3, keep the LM head's parameters whole for the model's whole forward.

    ZeRO-3 fetches a module's parameters around that module's own forward only; the trainers' LM-head passes read
    `lm_head.weight` inside the student's forward but outside the head's (the hidden states come from the backbone,
    the loss projects them chunk by chunk). Registered as external parameters of the root module, the head's
    parameters are fetched with the root's for its forward and again for its backward, so the chunks read the whole
    head and its gradient is reduce-scattered to the partitions like any other. (DeepSpeed's parameter getter also
    fetches and registers a partitioned parameter read during an eager forward, which is why the run measured the
    same without this; it stands aside under torch.compile, and the registration does not depend on it.)"""
    import deepspeed

    head = model.get_output_embeddings()
    for parameter in (head.weight, getattr(head, "bias", None)):
        if parameter is not None:
            deepspeed.zero.register_external_parameter(model, parameter)


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
    """The output layer of an (unwrapped, possibly PEFT, possibly FSDP2- or ZeRO-3-sharded) causal LM, keeping the
    first `vocab_size` logits if given."""
    head = unwrapped_model.get_output_embeddings()
    config = unwrapped_model.config.get_text_config()
    return OutputHead(
        weight=_whole(head.weight),
        bias=_whole(getattr(head, "bias", None)),
        softcap=getattr(config, "final_logit_softcapping", None),
        scale=_logit_scale(config),
        vocab_size=vocab_size,
    )
