"""OPDTrainer's checks of its arguments that need no weights: they run first, so bad input fails before any load."""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import PreTrainedModel

from .self_distillation import SELF_TEACHER

if TYPE_CHECKING:
    from .opd_config import OPDConfig


def check_datasets(train_dataset, eval_dataset, args: OPDConfig) -> None:
    datasets = {"train_dataset": train_dataset}
    if isinstance(eval_dataset, dict):
        datasets.update({f"eval_dataset[{name!r}]": data for name, data in eval_dataset.items()})
    else:
        datasets["eval_dataset"] = eval_dataset
    for name, data in datasets.items():
        columns = getattr(data, "column_names", None)
        if data is None or columns is None:  # iterable datasets may not know their columns
            continue
        if "prompt" not in columns:
            raise ValueError(
                f"`{name}` has no 'prompt' column (columns: {columns}). OPDTrainer generates from a 'prompt' "
                "column of plain strings or conversations (or splits GKD's 'messages' column of whole conversations); "
                "rename your prompt column, e.g. `dataset.rename_column('question', 'prompt')`."
            )
        if name == "train_dataset" and len(data) == 0:
            raise ValueError("`train_dataset` is empty.")
    needs_completions = args.lmbda < 1.0 and not args.seq_kd
    train_columns = getattr(train_dataset, "column_names", None)
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
