"""Loading and preparing a frozen teacher, and reading a model's config and tokenizer before any weights load.

Shared by OPDTrainer (and SimCTTrainer) and RLADTrainer, whose configs carry the same teacher fields
(`teacher_model_init_kwargs`, `teacher_model_revision`, `trust_remote_code`).
"""

from __future__ import annotations

import copy
import functools
import glob
import os

import torch
from transformers import AutoConfig, AutoProcessor, AutoTokenizer
from transformers.utils import logging as hf_logging
from trl.models import prepare_deepspeed
from trl.models.utils import prepare_fsdp
from trl.trainer.utils import create_model_from_path

logger = hf_logging.get_logger(__name__)


def model_config(model, args, revision: str | None = None):
    """The config of a model given as a path/Hub id (read without loading weights) or as a module."""
    if not isinstance(model, str):
        return model.config
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
        checkpoints = sorted(glob.glob(os.path.join(model, "checkpoint-*")), key=_step)
        hint = (f" It holds training checkpoints: pass one of them, e.g. {checkpoints[-1]!r}." if checkpoints
                else " Pass the directory that `save_pretrained` wrote (it holds config.json and the weights).")
        raise ValueError(f"{model!r} is a directory but not a model directory: it has no config.json.{hint}")
    try:
        return copy.deepcopy(_read_config(model, revision, args.trust_remote_code, _stamp(model)))
    except OSError as error:
        raise ValueError(
            f"Could not load the model config of {model!r}: it is not a local directory with a config.json, "
            f"and the Hub could not provide it ({error}). Check the path or Hub id, `revision`, and "
            "HF_HUB_OFFLINE."
        ) from error


def _stamp(path: str):
    """A local config file's modification time and size (a directory saved again is read again); None for Hub ids."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return None
    stat = os.stat(config_file)
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=32)
def _read_config(path: str, revision: str | None, trust_remote_code: bool, stamp):
    """The checks before loading read each model's config several times (vocabulary, prompt lengths, sizes): once
    from disk or the Hub per process and file version (a copy is handed out, so no caller changes the cached one)."""
    return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)


def _step(path: str) -> int:
    suffix = path.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else -1


def approximate_parameters(config) -> int | None:
    """Parameters of a decoder from its config (layers x (attention + MLP) + embeddings), to compare two models
    without loading them; None when the config lacks the sizes."""
    text = config.get_text_config()
    sizes = [getattr(text, name, None) for name in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                    "vocab_size")]
    if not all(isinstance(size, int) and size > 0 for size in sizes):
        return None
    hidden, layers, intermediate, vocab = sizes
    return layers * (4 * hidden * hidden + 3 * hidden * intermediate) + vocab * hidden


def warn_if_teacher_smaller(student, teacher, args, revision: str | None = None) -> None:
    """A teacher with fewer parameters than the student is legal but usually swapped arguments: warn once."""
    student_size = approximate_parameters(model_config(student, args))
    teacher_size = approximate_parameters(model_config(teacher, args, revision))
    if student_size is not None and teacher_size is not None and teacher_size < student_size:
        logger.warning_once(
            f"The teacher has about {teacher_size:,} parameters, fewer than the student's {student_size:,}: are the "
            "`model` and `teacher_model` arguments swapped? (The first argument is the student, which is trained.)"
        )


def try_tokenizer(model, args):
    """The tokenizer saved with a model (path/Hub id, or a module's `_name_or_path`); None when there is none."""
    path = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "")
    if not path:
        return None
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError):
        return None


def student_processing_class(model, args):
    """The processing class `trl.DistillationTrainer` loads for `model` when it gets none (the same call), so that
    the checks before loading and the trainer share one load (a second costs about a second for Qwen3's tokenizer);
    None when the model has none."""
    if isinstance(model, str):
        name, revision = model, (args.model_init_kwargs or {}).get("revision")
    else:
        name, revision = getattr(model.config, "_name_or_path", ""), None
    if not name:
        return None
    try:
        return AutoProcessor.from_pretrained(name, revision=revision, truncation_side="left", padding_side="left",
                                             trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError):
        return None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def same_tokenizer_files(first, second) -> bool:
    """Both models are local directories whose saved tokenizer files are byte for byte the same (then their
    tokenizers are, without loading the second)."""
    if not (isinstance(first, str) and isinstance(second, str) and os.path.isdir(first) and os.path.isdir(second)):
        return False
    for name in _TOKENIZER_FILES:
        paths = (os.path.join(first, name), os.path.join(second, name))
        if not all(os.path.isfile(path) for path in paths):
            return False
        with open(paths[0], "rb") as one, open(paths[1], "rb") as other:
            if one.read() != other.read():
                return False
    return True


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
    # As trl.DistillationTrainer: an unset dtype is transformers' default ("auto", the checkpoint's own dtype), not
    # create_model_from_path's float32, which doubled a bf16 teacher's memory (issue 18: 19.0 vs 16.0 GiB with
    # Qwen3-1.7B) and its start-up (the upcast).
    dtype = init_kwargs.get("dtype")
    init_kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
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
