r"""Rule-based rewards for math reasoning, with TRL's reward-function signature.

Both functions take ``(prompts, completions, **kwargs)`` and return one float per completion, so they plug into
``reward_funcs`` of any TRL GRPO-family trainer (``GRPOTrainer``, ``RLOOTrainer``, ``trl_opd.RLADTrainer``). TRL
passes every dataset column as a keyword argument (one value per completion); completions are strings or, for
conversational prompts, lists of messages.

* :func:`math_accuracy_reward` — 1.0 when the final ``\boxed{}`` answer equals the gold answer, graded like the
  evaluators (``trl_opd.eval.grading``: fast exact/number path, then Math-Verify in a bounded worker process).
* :func:`boxed_format_reward` — 1.0 when the completion closes its thinking block and ends in a non-empty boxed
  answer.

Combine them through ``reward_weights`` (e.g. ``reward_funcs=[math_accuracy_reward, boxed_format_reward]``,
``reward_weights=[1.0, 0.1]``). The AAPA anchor reward is ``trl_opd.anchor.make_anchor_reward(path)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .anchor import completion_text

#: Seconds allowed for one Math-Verify comparison; an overrun counts as wrong.
GRADING_TIMEOUT_S = 5.0


def _gold_answers(answer, solution, num_completions: int) -> Sequence:
    gold = answer if answer is not None else solution
    if gold is None:
        raise ValueError(
            "math_accuracy_reward needs the gold final answers: add an 'answer' column (or 'solution', TRL's name "
            "for it) to the training dataset, holding what the \\boxed{} of a correct completion contains."
        )
    if isinstance(gold, str) or len(gold) != num_completions:
        raise ValueError(
            f"Expected one gold answer per completion ({num_completions}); got {gold!r:.80}. TRL passes dataset "
            "columns as lists, one entry per completion."
        )
    return gold


def math_accuracy_reward(prompts, completions, answer=None, solution=None, **kwargs) -> list[float | None]:
    r"""1.0 if the completion's final answer equals the gold answer, else 0.0; None where the gold is missing.

    The final answer is the last ``\boxed{}`` after the last ``</think>``. A completion without a box scores 0
    (``require_boxed=True``): RL rewards only answers the policy commits to, and unboxed text never reaches
    Math-Verify. Grading is ``trl_opd.eval.grading.grade_many`` (the evaluators' grader), run in a shared
    one-worker pool with a ``GRADING_TIMEOUT_S`` bound per answer.

    Args:
        completions: strings or conversational message lists.
        answer: gold final answers, one per completion (dataset column ``answer``).
        solution: used when there is no ``answer`` column (TRL's ``accuracy_reward`` reads ``solution``). Note
            that some datasets (the trl_opd testbed) put a worked solution there; ``answer`` wins when both exist.
    """
    from .eval import grading  # lazy: the grader pulls in subprocess machinery only when rewards are computed

    gold = _gold_answers(answer, solution, len(completions))
    texts = [completion_text(completion) for completion in completions]
    scored = [index for index, value in enumerate(gold) if value is not None]
    results = grading.grade_many(
        [texts[i] for i in scored],
        [gold[i] for i in scored],
        require_boxed=True,
        pool=grading.default_pool(GRADING_TIMEOUT_S),
    )
    rewards: list[float | None] = [None] * len(completions)
    for index, result in zip(scored, results):
        rewards[index] = 1.0 if result.correct else 0.0
    return rewards


def is_well_formatted(text: str) -> bool:
    r"""True when ``text`` leaves no thinking block open and its final answer is a non-empty ``\boxed{}``.

    "No thinking block open": every ``<think>`` is followed later by a ``</think>`` (a ``</think>`` alone is fine:
    some chat templates open the block in the prompt). The final answer is the last box after the last
    ``</think>``, as the grader reads it.
    """
    from .eval.grading import extract_answer

    last_open, last_close = text.rfind("<think>"), text.rfind("</think>")
    if last_open > last_close:
        return False
    boxed = extract_answer(text)
    return boxed is not None and boxed.strip() != ""


def boxed_format_reward(prompts, completions, **kwargs) -> list[float]:
    r"""1.0 for a well-formatted completion (:func:`is_well_formatted`), else 0.0. Ignores correctness."""
    return [1.0 if is_well_formatted(completion_text(completion)) else 0.0 for completion in completions]


__all__ = ["GRADING_TIMEOUT_S", "boxed_format_reward", "is_well_formatted", "math_accuracy_reward"]
