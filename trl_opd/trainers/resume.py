"""Resuming after a crash: `resume_from_checkpoint=True` picks the latest *complete* checkpoint.

`transformers.trainer_utils.get_last_checkpoint` returns the highest-numbered `checkpoint-*` directory, even one
that a process killed while saving left half-written. The Trainer writes `trainer_state.json` last, so a checkpoint
without it is incomplete: we skip it (with a warning) and resume from the one before.
"""

from __future__ import annotations

import os
import re

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

logger = logging.get_logger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The highest-step `checkpoint-N` in `output_dir` holding a `trainer_state.json`, or None."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(match.group(1)), name)
        for name in os.listdir(output_dir)
        if (match := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    for _, name in reversed(steps):
        path = os.path.join(output_dir, name)
        if os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
            return path
        logger.warning(f"Skipping the incomplete checkpoint {path} (no {TRAINER_STATE_NAME}: the run was killed while "
                       "saving it); resuming from an earlier one.")
    return None


def resolve_resume_from_checkpoint(resume_from_checkpoint, output_dir: str):
    """`True` -> the latest complete checkpoint (ValueError if none, as the Trainer does); anything else unchanged."""
    if resume_from_checkpoint is not True:
        return resume_from_checkpoint
    checkpoint = last_complete_checkpoint(output_dir)
    if checkpoint is None:
        raise ValueError(f"No complete checkpoint found in output directory ({output_dir}) to resume from.")
    return checkpoint
