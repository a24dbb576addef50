"""OPDTrainer's checks of its arguments that need no weights: they run first, so bad input fails before any load."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from transformers import PreTrainedModel

from .self_distillation import SELF_TEACHER

if TYPE_CHECKING:
    from .opd_config import OPDConfig


def dataset_columns(data) -> list[str] | None:
    """A dataset's columns; for an iterable dataset that does not declare them, the keys of its first row (read
    now, so a missing column fails here rather than with a bare KeyError at the first batch); None if unknown."""
    columns = getattr(data, "column_names", None)
    if columns is not None or data is None:
        return columns
    try:
        row = next(iter(data))
    except (StopIteration, TypeError):
        return None
    return list(row) if isinstance(row, dict) else None


def check_prompt_columns(train_dataset, eval_dataset, trainer_name: str = "OPDTrainer") -> None:
    """Every dataset has a 'prompt' column (iterable datasets: in their first row) and the training set has rows."""
    datasets = {"train_dataset": train_dataset}
    if isinstance(eval_dataset, dict):
        datasets.update({f"eval_dataset[{name!r}]": data for name, data in eval_dataset.items()})
    else:
        datasets["eval_dataset"] = eval_dataset
    for name, data in datasets.items():
        columns = dataset_columns(data)
        if data is None or columns is None:  # e.g. a custom iterable with no rows to read
            continue
        if "prompt" not in columns:
            where = "" if hasattr(data, "column_names") and data.column_names is not None else " (read from its first row)"
            gkd = " (or splits GKD's 'messages' column of whole conversations)" if trainer_name == "OPDTrainer" else ""
            raise ValueError(
                f"`{name}` has no 'prompt' column (columns{where}: {columns}). {trainer_name} generates from a "
                f"'prompt' column of plain strings or conversations{gkd}; rename your prompt column, e.g. "
                "`dataset.rename_column('question', 'prompt')`."
            )
        if name == "train_dataset" and hasattr(data, "__len__") and len(data) == 0:
            raise ValueError("`train_dataset` is empty.")


def check_dataset_size(train_dataset, batch: int, how: str) -> None:
    """A training set smaller than one batch of prompts would train 0 steps and exit 0 (the sampler keeps whole
    batches only); `how` says how `batch` follows from the config."""
    if train_dataset is None or not hasattr(train_dataset, "__len__"):
        return
    rows = len(train_dataset)
    if 0 < rows < batch:
        raise ValueError(
            f"`train_dataset` has {rows} rows, fewer than one batch of {batch} prompts ({how}): training would run "
            "0 steps. Add rows, or lower per_device_train_batch_size or gradient_accumulation_steps."
        )


def check_output_dir(args) -> None:
    """`output_dir` must be a directory this process can create or write, checked before any weights load (else the
    first checkpoint fails hours in)."""
    path = os.path.abspath(args.output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"`output_dir`={args.output_dir!r} is a file, not a directory; choose another output_dir.")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(
            f"`output_dir`={args.output_dir!r} cannot be created: {parent!r} is a file, not a directory. Choose "
            "another output_dir."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(
            f"`output_dir`={args.output_dir!r} is not writable ({parent!r} denies this user write access); choose a "
            "directory you can write, or fix its permissions."
        )


def check_datasets(train_dataset, eval_dataset, args: OPDConfig) -> None:
    check_prompt_columns(train_dataset, eval_dataset, "OPDTrainer")
    needs_completions = args.lmbda < 1.0 and not args.seq_kd
    train_columns = dataset_columns(train_dataset)
    if needs_completions and train_columns is not None and "completion" not in train_columns:
        raise ValueError(
            f"lmbda={args.lmbda} makes some batches off-policy, which read the dataset's 'completion' column, but "
            f"`train_dataset` has none (columns: {train_columns}). Add a 'completion' column, set seq_kd=True to "
            "let the teacher generate them, or set lmbda=1.0 for pure on-policy training."
        )


def check_teacher_argument(teacher_model) -> None:
    if teacher_model is None:
        raise ValueError(
            "OPDTrainer needs a teacher: pass `teacher_model=` (a model id/path or a PreTrainedModel) or set "
            "`teacher_model_name_or_path` in the OPDConfig."
        )
    if not isinstance(teacher_model, (str, PreTrainedModel)):
        raise TypeError(
            f"`teacher_model` must be a model id/path, a PreTrainedModel or {SELF_TEACHER!r}, "
            f"got {type(teacher_model)}."
        )


def check_teacher_context(train_dataset, args: OPDConfig, privileged: bool) -> None:
    """The privileged prompt needs its dataset columns; guided rollouts need the privileged prompt."""
    if args.guided_fraction > 0 and not privileged:
        raise ValueError(
            f"guided_fraction={args.guided_fraction} generates from the teacher's privileged prompt, but this "
            "teacher gets none: use teacher_model='self' or set use_teacher_context=True (with a "
            "`teacher_context_column` in the dataset), or set guided_fraction=0."
        )
    columns = getattr(train_dataset, "column_names", None)
    if not privileged or columns is None:
        return
    needed = {"teacher_context_column": args.teacher_context_column}
    if args.teacher_problem_column is not None:
        needed["teacher_problem_column"] = args.teacher_problem_column
    for name, column in needed.items():
        if column not in columns:
            raise ValueError(
                f"The teacher's privileged prompt reads the column {column!r} (`{name}`), but `train_dataset` has "
                f"none (columns: {columns}). Set `{name}` to the column that holds it, add the column, or turn the "
                "privileged context off with use_teacher_context=False."
            )
