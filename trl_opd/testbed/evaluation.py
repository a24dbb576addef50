r"""Held-out accuracy of a testbed model and the strategy analysis of its answers.

Grading: exact match of the last ``\boxed{}`` content (``trl_opd.eval.grading.extract_boxed``) with
the problem's ``answer`` string, after greedy decoding of a left-padded batch.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

import torch

from trl_opd.eval.grading import extract_boxed
from trl_opd.testbed.task import parse_prompt, strategy_order, strategy_pairs

_STEP_PATTERN = re.compile(r"(\d+)\+(\d+)=(\d+)\.")


def grade_answer(completion: str, answer: str) -> bool:
    r"""True when the last ``\boxed{}`` of ``completion`` holds exactly ``answer``."""
    return extract_boxed(completion) == str(answer).strip()


def _prompt_text(prompt, tokenizer) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _default_max_new_tokens(problems: Sequence[dict], tokenizer) -> int:
    completions = [p["completion"] for p in problems if p.get("completion")]
    if not completions:
        return 128
    longest = max(len(ids) for ids in tokenizer(completions, add_special_tokens=False)["input_ids"])
    return longest + 8  # room for EOS and a slightly longer wrong answer


@torch.no_grad()
def generate_completions(
    model, tokenizer, prompts: Sequence, *, batch_size: int = 300, max_new_tokens: int = 64
) -> list[str]:
    """Greedy completions (special tokens removed) of plain or conversational ``prompts``, in batches."""
    if tokenizer.padding_side != "left":
        raise ValueError("Batched generation needs tokenizer.padding_side='left' (right padding corrupts outputs).")
    texts = [_prompt_text(p, tokenizer) for p in prompts]
    was_training, completions = model.training, []
    model.eval()
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(model.device)
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return completions


def accuracy(
    model,
    tokenizer,
    problems: Iterable[dict],
    *,
    batch_size: int = 300,
    max_new_tokens: int | None = None,
    return_records: bool = False,
):
    """Share of ``problems`` whose greedy completion boxes the right answer.

    Args:
        problems: dicts (or a ``datasets.Dataset``) with ``prompt`` (plain or conversational) and ``answer``.
        max_new_tokens: default: the longest reference ``completion`` in tokens + 8, or 128 without completions.
        return_records: also return one dict per problem: ``prompt``, ``completion`` (generated),
            ``predicted`` (boxed content or None), ``answer``, ``correct``.

    Returns:
        ``float`` in [0, 1], or ``(float, records)`` with ``return_records=True``.
    """
    problems = list(problems)
    if not problems:
        raise ValueError("accuracy() needs at least one problem.")
    if max_new_tokens is None:
        max_new_tokens = _default_max_new_tokens(problems, tokenizer)
    completions = generate_completions(
        model, tokenizer, [p["prompt"] for p in problems], batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    records = [
        {
            "prompt": problem["prompt"],
            "completion": completion,
            "predicted": extract_boxed(completion),
            "answer": str(problem["answer"]),
            "correct": grade_answer(completion, problem["answer"]),
        }
        for problem, completion in zip(problems, completions)
    ]
    score = sum(r["correct"] for r in records) / len(records)
    return (score, records) if return_records else score


def analyse_answer(prompt: str, completion: str) -> dict:
    """Which strategy an additions-only answer follows, and whether it stays in it.

    The strategy is read from the first step ``p+q=x.``: the index (into ``task.strategy_pairs``) of the
    ordered pair of prompt terms it adds, or None when ``p, q`` are not two distinct prompt terms. Each later
    step must add the running result and the next remaining term in reading order (what the strategy
    prescribes); adding any other prompt term there is a *wrong remaining term*, the signature of mixing
    strategies mid-answer.

    Returns:
        dict with ``strategy`` (int | None), ``num_steps``, ``consistent`` (every step follows the strategy
        identified by the first step and the answer has as many steps as the prompt has operations),
        ``wrong_remaining_term`` (a later step adds a prompt term other than the prescribed one),
        ``arithmetic_ok`` (every written sum is right).
    """
    terms, operators = parse_prompt(prompt)
    if any(op != "+" for op in operators):
        raise ValueError("analyse_answer() needs an additions-only (multi-strategy) prompt.")
    steps = [tuple(int(v) for v in step) for step in _STEP_PATTERN.findall(completion)]
    result = {
        "strategy": None,
        "num_steps": len(steps),
        "consistent": False,
        "wrong_remaining_term": False,
        "arithmetic_ok": all(a + b == c for a, b, c in steps),
    }
    if not steps:
        return result
    result["strategy"] = _first_step_strategy(terms, steps[0][:2])
    if result["strategy"] is None:
        return result
    order = [terms[i] for i in strategy_order(len(terms), result["strategy"])]
    follows = True
    for index, (left, right, _) in enumerate(steps[1:], start=1):
        expected = order[index + 1] if index + 1 < len(order) else None
        carried = left == steps[index - 1][2]
        if right != expected and right in terms:
            result["wrong_remaining_term"] = True
        follows = follows and carried and right == expected
    result["consistent"] = follows and len(steps) == len(operators)
    return result


def _first_step_strategy(terms: list[int], pair: tuple[int, int]) -> int | None:
    for index, (i, j) in enumerate(strategy_pairs(len(terms))):
        if (terms[i], terms[j]) == pair:
            return index
    return None


def strategy_summary(records: Iterable[dict]) -> dict:
    """Shares over ``accuracy(..., return_records=True)`` records of an additions-only task.

    Returns:
        dict with ``strategy_shares`` ({strategy index or None: share}), ``consistent``, ``wrong_remaining_term``,
        ``dominant_strategy_share`` (share of the most used strategy) and ``count``.
    """
    analyses = [analyse_answer(r["prompt"], r["completion"]) for r in records]
    if not analyses:
        raise ValueError("strategy_summary() needs at least one record.")
    count = len(analyses)
    strategies = Counter(a["strategy"] for a in analyses)
    return {
        "count": count,
        "strategy_shares": {s: n / count for s, n in sorted(strategies.items(), key=lambda kv: -kv[1])},
        "dominant_strategy_share": max(strategies.values()) / count,
        "consistent": sum(a["consistent"] for a in analyses) / count,
        "wrong_remaining_term": sum(a["wrong_remaining_term"] for a in analyses) / count,
    }
