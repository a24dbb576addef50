r"""The testbed task: chains of additions and subtractions with every step written out.

A problem and its worked solution::

    prompt:     "Compute 59+63-15.\n"
    completion: "59+63=122. 122-15=107. \boxed{107}"

The completion carries no EOS: the tokenizer side (TRL's SFTTrainer appends ``eos_token`` to
plain-text completions) adds it.

Two settings share this module:

* **chains** (``num_strategies=1``): terms are combined left to right; with ``allow_subtraction``
  each operator is ``+`` or ``-`` with equal odds, and a subtraction that would make the running
  value negative is written as an addition instead, so every intermediate value is >= 0.
* **multi-strategy** (``num_strategies=K > 1``, additions only): a *strategy* is the ordered pair of
  terms added first; the remaining terms are then added in their reading order. For three terms
  ``a+b+c`` the strategies are, in this order, ``(0,1) (0,2) (1,2) (1,0) (2,0) (2,1)`` (term
  indices), so strategy 0 is left to right, K = 3 means the three unordered pairs in reading order
  and K = 6 all ordered pairs. A problem draws its strategy uniformly from the first K unless one is
  given. Terms are distinct in this setting so that every strategy gives a different completion and
  the strategy of an answer can be read back unambiguously (see ``evaluation.analyse_answer``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Iterator

HELDOUT_SIZE = 300
VALIDATION_SIZE = 300
_MAX_REJECTIONS = 10_000
_PROMPT_PATTERN = re.compile(r"Compute ([0-9+\-]+)\.")


@dataclass(frozen=True)
class TaskConfig:
    """Which arithmetic problems the testbed generates.

    Attributes:
        num_operations: operators per problem (a problem has ``num_operations + 1`` terms).
        digits: digits of every operand; operands are uniform in ``[10**(digits-1), 10**digits - 1]``.
        allow_subtraction: draw ``-`` as often as ``+`` (chains only).
        num_strategies: K. 1 = left-to-right chains; K > 1 = the multi-strategy setting (additions only,
            distinct terms), where a problem's first step adds one of the first K ordered pairs of terms.
    """

    num_operations: int = 2
    digits: int = 2
    allow_subtraction: bool = True
    num_strategies: int = 1

    def __post_init__(self):
        if self.num_operations < 1:
            raise ValueError(f"num_operations must be >= 1, got {self.num_operations}.")
        if self.digits < 1:
            raise ValueError(f"digits must be >= 1, got {self.digits}.")
        if self.num_strategies < 1:
            raise ValueError(f"num_strategies must be >= 1, got {self.num_strategies}.")
        if self.num_strategies > 1 and self.allow_subtraction:
            raise ValueError(
                "The multi-strategy setting (num_strategies > 1) is additions only: set allow_subtraction=False."
            )
        available = len(strategy_pairs(self.num_operations + 1))
        if self.num_strategies > available:
            raise ValueError(
                f"num_strategies={self.num_strategies} exceeds the {available} ordered pairs of "
                f"{self.num_operations + 1} terms: lower num_strategies or raise num_operations."
            )
        if problem_space_size(self) < 10 * (HELDOUT_SIZE + VALIDATION_SIZE):
            raise ValueError(
                f"{self} has only {problem_space_size(self)} distinct prompts, too few to hold out "
                f"{HELDOUT_SIZE + VALIDATION_SIZE} and still train: raise digits or num_operations."
            )

    def harder(self, extra_operations: int = 1, extra_digits: int = 0) -> "TaskConfig":
        """The difficulty knob: the same task with more operations and/or digits (out-of-distribution evaluation).

        In the multi-strategy setting a config that used every ordered pair keeps using every pair of the
        longer problem; otherwise K is kept.
        """
        if extra_operations < 0 or extra_digits < 0:
            raise ValueError("harder() only adds difficulty: extra_operations and extra_digits must be >= 0.")
        num_operations = self.num_operations + extra_operations
        num_strategies = self.num_strategies
        if num_strategies > 1 and num_strategies == len(strategy_pairs(self.num_operations + 1)):
            num_strategies = len(strategy_pairs(num_operations + 1))
        return dataclasses.replace(
            self, num_operations=num_operations, digits=self.digits + extra_digits, num_strategies=num_strategies
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@lru_cache(maxsize=None)
def strategy_pairs(num_terms: int) -> tuple[tuple[int, int], ...]:
    """All ordered pairs of term indices, in strategy order: forward pairs (i < j) lexicographically, then reversed.

    For 3 terms: ``((0, 1), (0, 2), (1, 2), (1, 0), (2, 0), (2, 1))``.
    """
    forward = list(itertools.combinations(range(num_terms), 2))
    return tuple(forward + [(j, i) for i, j in forward])


def problem_space_size(cfg: TaskConfig) -> int:
    """Number of distinct operand/operator sequences (an upper bound on distinct prompts)."""
    values = 9 * 10 ** (cfg.digits - 1)
    terms = cfg.num_operations + 1
    if cfg.num_strategies > 1:  # distinct terms
        return _falling_factorial(values, terms)
    operators = 2**cfg.num_operations if cfg.allow_subtraction else 1
    return values**terms * operators


def _falling_factorial(n: int, k: int) -> int:
    result = 1
    for i in range(k):
        result *= n - i
    return result


def derive_seed(*parts) -> int:
    """A 63-bit seed from any JSON-serialisable parts (stable across runs and platforms)."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _format_chain(terms: list[int], operators: list[str]) -> tuple[str, int]:
    """Worked left-to-right solution of ``terms[0] op terms[1] op ...``; returns (text, answer)."""
    steps, value = [], terms[0]
    for operator, term in zip(operators, terms[1:]):
        result = value + term if operator == "+" else value - term
        steps.append(f"{value}{operator}{term}={result}.")
        value = result
    return " ".join(steps) + f" \\boxed{{{value}}}", value


def _draw_chain(rng: random.Random, cfg: TaskConfig) -> tuple[list[int], list[str]]:
    low, high = 10 ** (cfg.digits - 1), 10**cfg.digits - 1
    terms = [rng.randint(low, high) for _ in range(cfg.num_operations + 1)]
    operators, value = [], terms[0]
    for term in terms[1:]:
        operator = "-" if cfg.allow_subtraction and rng.random() < 0.5 else "+"
        if operator == "-" and value - term < 0:
            operator = "+"  # keep every intermediate value non-negative
        value = value + term if operator == "+" else value - term
        operators.append(operator)
    return terms, operators


def strategy_order(num_terms: int, strategy: int) -> list[int]:
    """Term indices in the order strategy ``strategy`` adds them: its pair first, then the rest in reading order."""
    first, second = strategy_pairs(num_terms)[strategy]
    return [first, second] + [i for i in range(num_terms) if i not in (first, second)]


def make_problem(rng: random.Random, cfg: TaskConfig, strategy: int | None = None) -> dict:
    """Draw one problem.

    Args:
        rng: the random source (``random.Random``).
        cfg: the task.
        strategy: multi-strategy setting only: index into ``strategy_pairs`` (< ``cfg.num_strategies``) of the
            pair added first; None draws one uniformly. Chains accept None or 0.

    Returns:
        ``dict(prompt, completion, answer, solution, strategy)``: ``prompt`` ends with a newline, ``answer`` is
        the result as a string (what ``\\boxed{}`` holds), ``solution`` the worked solution (the completion's
        text; OPSD's privileged context), ``strategy`` the index used (0 for chains).
    """
    if strategy is not None and not 0 <= strategy < cfg.num_strategies:
        raise ValueError(
            f"strategy must be None or in [0, {cfg.num_strategies}) for num_strategies={cfg.num_strategies}, "
            f"got {strategy}."
        )
    if cfg.num_strategies == 1:
        terms, operators = _draw_chain(rng, cfg)
        expression = str(terms[0]) + "".join(f"{op}{t}" for op, t in zip(operators, terms[1:]))
        completion, answer = _format_chain(terms, operators)
        strategy = 0
    else:
        low, high = 10 ** (cfg.digits - 1), 10**cfg.digits - 1
        terms = rng.sample(range(low, high + 1), cfg.num_operations + 1)
        if strategy is None:
            strategy = rng.randrange(cfg.num_strategies)
        ordered = [terms[i] for i in strategy_order(len(terms), strategy)]
        expression = "+".join(map(str, terms))
        completion, answer = _format_chain(ordered, ["+"] * cfg.num_operations)
    return {
        "prompt": f"Compute {expression}.\n",
        "completion": completion,
        "answer": str(answer),
        "solution": completion,
        "strategy": strategy,
    }


def parse_prompt(prompt: str) -> tuple[list[int], list[str]]:
    """Terms and operators of a task prompt ("Compute 59+63-15.\\n" -> ([59, 63, 15], ["+", "-"]))."""
    match = _PROMPT_PATTERN.search(prompt)
    if match is None:
        raise ValueError(f"Not a testbed prompt (expected 'Compute <terms>.'): {prompt!r}")
    expression = match.group(1)
    terms = [int(t) for t in re.split(r"[+\-]", expression)]
    operators = re.findall(r"[+\-]", expression)
    return terms, operators


def _distinct_problems(cfg: TaskConfig, count: int, seed: int, exclude: set[str]) -> list[dict]:
    rng, problems, seen = random.Random(seed), [], set(exclude)
    rejections = 0
    while len(problems) < count:
        problem = make_problem(rng, cfg)
        if problem["prompt"] in seen:
            rejections += 1
            if rejections > _MAX_REJECTIONS:
                raise ValueError(f"Could not draw {count} distinct problems from {cfg}: raise digits or operations.")
            continue
        seen.add(problem["prompt"])
        problems.append(problem)
    return problems


@lru_cache(maxsize=32)
def _reserved(cfg: TaskConfig) -> tuple[tuple[dict, ...], tuple[dict, ...]]:
    heldout = _distinct_problems(cfg, HELDOUT_SIZE, derive_seed("heldout", cfg.to_dict()), set())
    reserved_prompts = {p["prompt"] for p in heldout}
    validation = _distinct_problems(cfg, VALIDATION_SIZE, derive_seed("validation", cfg.to_dict()), reserved_prompts)
    return tuple(heldout), tuple(validation)


def heldout_problems(cfg: TaskConfig) -> list[dict]:
    """The fixed test set of 300 distinct problems of ``cfg`` (same for every call); never in the training stream."""
    return [dict(p) for p in _reserved(cfg)[0]]


def validation_problems(cfg: TaskConfig) -> list[dict]:
    """300 further fixed problems, disjoint from the held-out set and also kept out of training.

    Early stopping (``training.sft``'s target accuracy) looks at these, so the held-out accuracy stays an
    unbiased test number.
    """
    return [dict(p) for p in _reserved(cfg)[1]]


def reserved_prompts(cfg: TaskConfig) -> frozenset[str]:
    """Prompts of the held-out and validation sets: what training data excludes by default."""
    heldout, validation = _reserved(cfg)
    return frozenset(p["prompt"] for p in heldout + validation)


def _exclusion_set(cfg: TaskConfig, exclude) -> frozenset[str]:
    if exclude is None:
        return reserved_prompts(cfg)
    return frozenset(p if isinstance(p, str) else p["prompt"] for p in exclude)


def iter_problems(
    cfg: TaskConfig, seed: int, strategy: int | None = None, exclude: Iterable | None = None
) -> Iterator[dict]:
    """Endless stream of training problems (repeats allowed, excluded prompts never produced).

    Args:
        exclude: problems (dicts with "prompt") or prompt strings to skip; None = the held-out and validation sets.
    """
    excluded = _exclusion_set(cfg, exclude)
    rng = random.Random(derive_seed("train", cfg.to_dict(), seed))
    while True:
        problem = make_problem(rng, cfg, strategy)
        if problem["prompt"] not in excluded:
            yield problem


def make_dataset(
    n: int, cfg: TaskConfig, seed: int = 0, strategy: int | None = None, exclude: Iterable | None = None
):
    """The first ``n`` problems of ``iter_problems(cfg, seed, strategy, exclude)`` as a ``datasets.Dataset``.

    Columns: ``prompt`` (plain string), ``completion``, ``answer``, ``solution``, ``strategy``.
    """
    from datasets import Dataset

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    return Dataset.from_list(list(itertools.islice(iter_problems(cfg, seed, strategy, exclude), n)))


def _stream_generator(cfg_dict: dict, seed: int, strategy: int | None, exclude: list[str] | None):
    yield from iter_problems(TaskConfig(**cfg_dict), seed, strategy, exclude)


def task_stream(cfg: TaskConfig, seed: int = 0, strategy: int | None = None, exclude: Iterable | None = None):
    """``iter_problems`` as an endless ``datasets.IterableDataset`` (training data made on the fly, no epochs)."""
    from datasets import IterableDataset

    excluded = None if exclude is None else sorted(_exclusion_set(cfg, exclude))
    return IterableDataset.from_generator(
        _stream_generator,
        gen_kwargs={"cfg_dict": cfg.to_dict(), "seed": seed, "strategy": strategy, "exclude": excluded},
    )


def corpus(cfg: TaskConfig, n: int = 2000, seed: int = 0) -> list[str]:
    """Task text (prompt + completion of ``n`` training problems), e.g. for training a tokenizer."""
    stream = iter_problems(cfg, seed)
    return [p["prompt"] + p["completion"] for p in itertools.islice(stream, n)]
