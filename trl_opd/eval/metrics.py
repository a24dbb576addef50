r"""Sample-based accuracy metrics over problems, with standard errors (``reference/landscape.md`` §4.3).

For problem i with n_i samples of which c_i are correct, over P problems:

* avg@n: mean over problems of c_i / n_i (also called mean@n, Avg@n, "pass@1 estimated from n samples").
* pass@k: mean over problems of the unbiased estimator 1 - C(n_i - c_i, k) / C(n_i, k) (Chen et al. 2021).
* maj@n (cons@n): the problem counts as solved when its most frequent answer is correct.

Standard errors are over problems: the sample standard deviation (ddof=1) of the per-problem scores divided by
sqrt(P). They treat the problems as a sample and include the sampling noise of the n generations; they are NaN
when P < 2.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import NamedTuple


class Estimate(NamedTuple):
    """A mean over problems and its standard error."""

    mean: float
    stderr: float


def standard_error(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1) of ``values`` over sqrt(len); NaN for fewer than two values."""
    count = len(values)
    if count < 2:
        return float("nan")
    mean = sum(values) / count
    variance = sum((value - mean) ** 2 for value in values) / (count - 1)
    return math.sqrt(variance / count)


def _estimate(scores: Sequence[float]) -> Estimate:
    if not scores:
        raise ValueError("No problems to score: pass at least one problem.")
    return Estimate(sum(scores) / len(scores), standard_error(scores))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from ``n`` samples with ``c`` correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{j=n-c+1}^{n} (1 - k/j), which avoids huge binomials; it is 1 when n - c < k.
    """
    for label, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{label} must be an int, got {value!r}.")
    if not 0 <= c <= n:
        raise ValueError(f"Need 0 <= c <= n, got n={n}, c={c}.")
    if not 1 <= k <= n:
        raise ValueError(
            f"Need 1 <= k <= n (k samples drawn from n), got n={n}, k={k}; lower k or sample more."
        )
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / j for j in range(n - c + 1, n + 1))


def _check_samples(correct: Sequence[Sequence[bool]]) -> None:
    for index, samples in enumerate(correct):
        if len(samples) == 0:
            raise ValueError(f"Problem {index} has no samples; every problem needs at least one.")


def avg_at_n(correct: Sequence[Sequence[bool]]) -> Estimate:
    """avg@n: mean over problems of the fraction of correct samples. ``correct[i][j]``: sample j of problem i."""
    _check_samples(correct)
    return _estimate([sum(map(bool, samples)) / len(samples) for samples in correct])


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> Estimate:
    """pass@k averaged over problems (:func:`pass_at_k` per problem); every problem needs at least k samples."""
    _check_samples(correct)
    return _estimate([pass_at_k(len(samples), sum(map(bool, samples)), k) for samples in correct])


def majority_index(classes: Sequence[Hashable | None]) -> int | None:
    """Index of the first sample of the winning answer class; None when no sample has an answer.

    ``classes[j]`` is sample j's answer class (None: no answer, does not vote). Most votes win; ties go to the
    class that appears first.
    """
    votes = Counter(label for label in classes if label is not None)
    if not votes:
        return None
    first_seen = {}
    for index, label in enumerate(classes):
        if label is not None:
            first_seen.setdefault(label, index)
    winner = max(votes, key=lambda label: (votes[label], -first_seen[label]))
    return first_seen[winner]


def maj_at_n(correct: Sequence[Sequence[bool]], classes: Sequence[Sequence[Hashable | None]]) -> Estimate:
    """maj@n (cons@n): fraction of problems whose majority answer is correct.

    Args:
        correct: ``correct[i][j]``, whether sample j of problem i is right.
        classes: ``classes[i][j]``, the answer class of that sample (equal classes = the same answer; None = no
            answer). :func:`trl_opd.eval.grading.answer_classes` builds them with answer normalisation and
            Math-Verify equivalence. A problem where no sample has an answer counts as wrong.
    """
    _check_samples(correct)
    if len(correct) != len(classes) or any(len(a) != len(b) for a, b in zip(correct, classes)):
        raise ValueError(
            "correct and classes must have the same shape: one class per sample of each problem."
        )
    scores = []
    for samples, sample_classes in zip(correct, classes):
        winner = majority_index(sample_classes)
        scores.append(float(winner is not None and bool(samples[winner])))
    return _estimate(scores)


def default_ks(n: int) -> list[int]:
    """The k of pass@k reported for n samples: powers of two up to n, and n itself."""
    ks = [2**power for power in range(n.bit_length()) if 2**power <= n]
    return sorted(set(ks + [n]))


def summarize(
    correct: Sequence[Sequence[bool]],
    classes: Sequence[Sequence[Hashable | None]],
    *,
    ks: Sequence[int] | None = None,
) -> dict[str, float]:
    """avg@n, pass@k for each k, maj@n, each with a ``_stderr`` entry; n is the smallest sample count."""
    n = min(len(samples) for samples in correct) if correct else 0
    results: dict[str, float] = {}
    named = [(f"avg@{n}", avg_at_n(correct))]
    named += [(f"pass@{k}", mean_pass_at_k(correct, k)) for k in (ks or default_ks(n))]
    named += [(f"maj@{n}", maj_at_n(correct, classes))]
    for name, estimate in named:
        results[name], results[f"{name}_stderr"] = estimate.mean, estimate.stderr
    return results
