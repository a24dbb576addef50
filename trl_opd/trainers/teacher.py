"""Loading and preparing a frozen teacher, and reading a model's config and tokenizer before any weights load.

Shared by OPDTrainer (and SimCTTrainer) and RLADTrainer, whose configs carry the same teacher fields
(`teacher_model_init_kwargs`, `teacher_model_revision`, `trust_remote_code`).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoTokenizer
from trl.models import prepare_deepspeed
from trl.models.utils import prepare_fsdp
from trl.trainer.utils import create_model_from_path


def model_config(model, args, revision: str | None = None):
    """The config of a model given as a path/Hub id (read without loading weights) or as a module."""
    if not isinstance(model, str):
        return model.config
    try:
        return AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=args.trust_remote_code)
    except OSError as error:
        raise ValueError(
            f"Could not load the model config of {model!r}: it is not a local directory with a config.json, "
            f"and the Hub could not provide it ({error}). Check the path or Hub id, `revision`, and "
            "HF_HUB_OFFLINE."
        ) from error


def try_tokenizer(model, args):
    """The tokenizer saved with a model (path/Hub id, or a module's `_name_or_path`); None when there is none."""
    path = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "")
    if not path:
        return None
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError):
        return None


def check_teacher_init_kwargs(teacher_model, args) -> None:
    """`teacher_model_init_kwargs` only make sense for a teacher given as a path/Hub id (checked before any loading)."""
    if not isinstance(teacher_model, str) and args.teacher_model_init_kwargs is not None:
        raise ValueError(
            "You passed `teacher_model_init_kwargs` but the teacher is already instantiated; remove them or pass the "
            "teacher as a model id/path."
        )


def load_teacher(teacher_model, args):
    """A teacher module from a module (returned as is) or a path/Hub id (loaded with the config's teacher fields)."""
    check_teacher_init_kwargs(teacher_model, args)
    if not isinstance(teacher_model, str):
        return teacher_model
    init_kwargs = dict(args.teacher_model_init_kwargs or {})
    if args.teacher_model_revision is not None:
        init_kwargs.setdefault("revision", args.teacher_model_revision)
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        init_kwargs["device_map"] = None  # distributed training needs device_map=None
    init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return create_model_from_path(teacher_model, **init_kwargs)


def prepare_teacher(trainer, teacher):
    """Frozen (eval mode, no gradients) and placed by the trainer's accelerator: ZeRO-3 / FSDP shard it too."""
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    if trainer.is_deepspeed_enabled:
        return prepare_deepspeed(teacher, trainer.accelerator)
    if trainer.is_fsdp_enabled:  # TRL leaves the teacher unsharded under FSDP (its PR #6573); we shard it
        return prepare_fsdp(teacher, trainer.accelerator)
    return trainer.accelerator.prepare_model(teacher, evaluation_mode=True)
