r"""Privileged teacher prompts for self-distillation (OPSD, PW-OPSD, EDGE-OPD): templates and row-level helpers.

Pure Python (no trainer state): :class:`OPDTrainer` calls these to build the teacher's prompt from a dataset row
(methods.md §0.9, §2.3); which rows get an EDGE-OPD guided rollout (§5.2) is drawn by
:func:`~trl_opd.trainers.rows.seeded_rows`.

Template syntax: the placeholders ``{problem}``, ``{solution}`` and ``{context}`` are replaced in one pass (the
text substituted in is never scanned again); every other brace is literal, so LaTeX such as ``\boxed{}`` needs no
escaping. ``{solution}`` and ``{context}`` are two names for the same value, the row's privileged context.
"""

from __future__ import annotations

import copy
import re

SELF_TEACHER = "self"

OPSD_V2 = (
    "Problem: {problem}\n\n"
    "Here is a reference solution to this problem:\n"
    "=== Reference Solution Begin ===\n"
    "{solution}\n"
    "=== Reference Solution End ===\n\n\n"
    "After reading the reference solution above, make sure you truly understand the reasoning behind each step "
    "\u2014 do not copy or paraphrase it. Now, using your own words and independent reasoning, derive the same "
    "final answer to the problem above. Think step by step, explore different approaches, and don't be afraid to "
    "backtrack or reconsider if something doesn't work out:\n\n"
    "Please reason step by step, and put your final answer within \\boxed{}."
)
OPSD_V1 = (
    "{problem}\n\n"
    "Here is a reference solution to this problem:\n{solution}\n\n\n"
    "After understanding the reference solution and the rationale behind each step, now articulate your own "
    "step-by-step reasoning that derives the same final answer to the problem below:\n\n"
    "Please reason step by step, and put your final answer within \\boxed{}."
)
# Named presets of `teacher_prompt_template` (methods.md §2.3): opsd_v2 is the PW-OPSD fork's, opsd_v1 the March
# 2026 OPSD reference code's.
TEACHER_PROMPT_TEMPLATES = {"opsd_v1": OPSD_V1, "opsd_v2": OPSD_V2}

_PLACEHOLDER = re.compile(r"\{(problem|solution|context)\}")


def resolve_teacher_prompt_template(template: str) -> str:
    """The template text of a preset name (``"opsd_v1"``, ``"opsd_v2"``) or of a literal template string.

    Raises a ValueError unless the text has a ``{problem}`` placeholder and a ``{solution}`` or ``{context}`` one.
    """
    text = TEACHER_PROMPT_TEMPLATES.get(template, template)
    found = set(_PLACEHOLDER.findall(text))
    if "problem" not in found or not found & {"solution", "context"}:
        presets = ", ".join(map(repr, TEACHER_PROMPT_TEMPLATES))
        raise ValueError(
            f"`teacher_prompt_template`={template!r} is neither a preset ({presets}) nor a template with a "
            "'{problem}' placeholder and a '{solution}' (or '{context}') placeholder for the privileged context."
        )
    return text


def render_teacher_prompt(template: str, problem: str, context: str) -> str:
    """Substitute ``problem`` and the privileged ``context`` into a resolved template (one pass)."""
    values = {"problem": problem, "solution": context, "context": context}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def _last_user_index(conversation: list[dict]) -> int:
    for index in range(len(conversation) - 1, -1, -1):
        if conversation[index].get("role") == "user":
            return index
    raise ValueError("A conversational prompt needs a user message to hold the teacher's privileged context.")


def _text(content) -> str:
    """A message's text: plain string content, or the text parts of a list of content blocks."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def prompt_problem(prompt) -> str:
    """The problem text of a student prompt: the string itself, or the last user message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    return _text(prompt[_last_user_index(prompt)]["content"])


def teacher_prompt(prompt, context: str, template: str, problem: str | None = None):
    """The teacher's prompt for one row: the student's prompt with the privileged context added by ``template``.

    Args:
        prompt: the student's prompt, a string or a conversation (list of ``{"role", "content"}`` messages).
        context: the row's privileged context (e.g. a reference solution).
        template: a resolved template (see :func:`resolve_teacher_prompt_template`).
        problem: the text for ``{problem}``; default :func:`prompt_problem` of ``prompt``.

    Returns:
        A string for a string prompt. For a conversation, a copy whose last user message is replaced by the
        rendered template (system and earlier messages are kept), so the chat template wraps it as usual.
    """
    problem = prompt_problem(prompt) if problem is None else problem
    rendered = render_teacher_prompt(template, problem, context)
    if isinstance(prompt, str):
        return rendered
    conversation = copy.deepcopy(prompt)
    conversation[_last_user_index(conversation)]["content"] = rendered
    return conversation
