r"""Teacher-aligned prompts (methods.md §7.3, arXiv 2604.13016 §5): the dynamics paper's second recovery recipe.

Pure Python (no trainer state). Template alignment formats a training prompt the way the teacher was trained
(its RL template), for both the student's rollout and the teacher's scoring; :class:`OPDTrainer` applies it to a
share ``aligned_prompt_ratio`` of the training prompts, chosen per row by :func:`~trl_opd.trainers.rows.seeded_rows`
(stream ``ALIGNED_STREAM``). Content alignment (the teacher's own RL prompts mixed with other prompts) is a choice of
dataset: :func:`mix_prompt_datasets`.

Template syntax: ``{problem}`` is replaced by the prompt's text (one pass); every other brace is literal, so LaTeX
such as ``\boxed{}`` needs no escaping.
"""

from __future__ import annotations

import copy
import re

from .self_distillation import _last_user_index, prompt_problem

# The teacher's RL template in the paper's experiments (App. C: JustRL / DAPO / Qwen3 math RL).
BOXED = "{problem} Please reason step by step, and put your final answer within \\boxed{}."
ALIGNED_PROMPT_TEMPLATES = {"boxed": BOXED}

_PROBLEM = re.compile(r"\{problem\}")


def resolve_aligned_prompt_template(template: str) -> str:
    """The template text of a preset name (``"boxed"``) or of a literal template string with ``{problem}``."""
    text = ALIGNED_PROMPT_TEMPLATES.get(template, template)
    if not isinstance(text, str) or not _PROBLEM.search(text):
        presets = ", ".join(map(repr, ALIGNED_PROMPT_TEMPLATES))
        raise ValueError(
            f"`aligned_prompt_template`={template!r} is neither a preset ({presets}) nor a template with a "
            "'{problem}' placeholder for the prompt's text, e.g. "
            "'{problem} Please reason step by step, and put your final answer within \\\\boxed{}.'"
        )
    return text


def aligned_prompt(prompt, template: str):
    """``prompt`` formatted with a resolved template: a string for a string prompt; for a conversation, a copy
    whose last user message is the rendered template (system and earlier messages are kept)."""
    rendered = _PROBLEM.sub(lambda _: prompt_problem(prompt), template)
    if isinstance(prompt, str):
        return rendered
    conversation = copy.deepcopy(prompt)
    conversation[_last_user_index(conversation)]["content"] = rendered
    return conversation


def mix_prompt_datasets(aligned, other, ratio: float, *, seed: int = 0):
    """Content alignment: a dataset drawing each row from ``aligned`` (e.g. the teacher's own RL prompts) with
    probability ``ratio`` and from ``other`` otherwise, until one of them runs out (``datasets.interleave_datasets``,
    seeded, so the mix is reproducible). Both need the same columns (at least ``prompt``)."""
    from datasets import interleave_datasets

    if not 0.0 < ratio < 1.0:
        raise ValueError(
            f"ratio must be in (0, 1) (the share of teacher-aligned prompts), got {ratio}; for 0 or 1 use one "
            "dataset alone."
        )
    return interleave_datasets([aligned, other], probabilities=[ratio, 1.0 - ratio], seed=seed)
