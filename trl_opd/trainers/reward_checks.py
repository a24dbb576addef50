"""A dry call of each reward function before any weights load: its return must be one number (or None) per
completion, else GRPO fails at the first step with a bare TypeError or a shape mismatch."""

from __future__ import annotations

import numbers

import torch
from transformers.utils import logging as hf_logging

logger = hf_logging.get_logger(__name__)


def _dry_inputs(train_dataset, rows: int = 2):
    """Prompts, empty completions and the other columns of the first `rows` rows (map-style datasets only)."""
    if train_dataset is None or not hasattr(train_dataset, "__len__") or len(train_dataset) == 0:
        return None
    columns = getattr(train_dataset, "column_names", None)
    if not columns or "prompt" not in columns:
        return None
    batch = train_dataset[: min(rows, len(train_dataset))]
    prompts = batch["prompt"]
    completions = [[{"role": "assistant", "content": ""}] if isinstance(p, list) else "" for p in prompts]
    kwargs = {key: value for key, value in batch.items() if key not in ("prompt", "completion")}
    return prompts, completions, kwargs


def check_reward_functions(reward_funcs, train_dataset) -> None:
    """Call each Python reward function once on the first rows with empty completions and check what it returns.
    A function that raises on that input is skipped (with a log line): empty completions are not its real input."""
    funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    inputs = _dry_inputs(train_dataset)
    if inputs is None:
        return
    prompts, completions, kwargs = inputs
    for func in funcs:
        if not callable(func) or isinstance(func, torch.nn.Module):
            continue  # a reward model (path or module): scored by GRPO's own code
        name = getattr(func, "__name__", type(func).__name__)
        try:
            output = func(prompts=prompts, completions=completions, completion_ids=[[] for _ in prompts],
                          trainer_state=None, **kwargs)
        except Exception as error:  # noqa: BLE001 - any failure on a dry input only skips this check
            logger.info("Reward function %s raised on a dry call with empty completions (%r); its return is not "
                        "checked before training.", name, error)
            continue
        check_reward_output(name, output, len(prompts))


def check_reward_output(name: str, output, expected: int) -> None:
    shape_fix = ("Return a list with one float (or None) per completion, e.g. `return [score(c) for c in "
                 "completions]`.")
    if isinstance(output, (str, bytes, dict)) or not hasattr(output, "__len__"):
        raise ValueError(
            f"Reward function {name} returned {str(output)[:80]!r} ({type(output).__name__}) for {expected} "
            f"completions on a dry call. {shape_fix}"
        )
    if len(output) != expected:
        raise ValueError(
            f"Reward function {name} returned {len(output)} values for {expected} completions on a dry call. "
            f"{shape_fix}"
        )
    for value in output:
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise ValueError(
                f"Reward function {name} returned {value!r} ({type(value).__name__}) among its rewards on a dry call. "
                f"{shape_fix}"
            )
