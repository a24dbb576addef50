"""avg@n, unbiased pass@k, maj@n and their standard errors against brute-force definitions."""

import itertools
import math
import random
import statistics
from fractions import Fraction

import pytest

from trl_opd.eval.metrics import (
    avg_at_n,
    default_ks,
    maj_at_n,
    majority_index,
    mean_pass_at_k,
    pass_at_k,
    standard_error,
    summarize,
)


def brute_force_pass_at_k(outcomes, k):
    """Fraction of the k-subsets of the samples that contain at least one correct sample (exact)."""
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    hits = sum(any(outcomes[i] for i in subset) for subset in subsets)
    return Fraction(hits, len(subsets))


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_subset_enumeration(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(outcomes, k)), abs=1e-12)


def test_pass_at_k_matches_the_binomial_formula_for_large_n():
    n, c, k = 64, 5, 16
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12)


def test_pass_at_1_is_the_fraction_correct_and_pass_at_n_is_any_correct():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 1, 10) == 1.0
    assert pass_at_k(10, 0, 10) == 0.0


@pytest.mark.parametrize(
    ("n", "c", "k", "message"),
    [(4, 5, 1, "c <= n"), (4, -1, 1, "c <= n"), (4, 2, 5, "k <= n"), (4, 2, 0, "k <= n"), (4.0, 2, 1, "int")],
)
def test_pass_at_k_rejects_bad_input(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)


def test_standard_error_is_the_sample_std_over_sqrt_p():
    values = [0.0, 0.25, 1.0, 0.5]
    assert standard_error(values) == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))
    assert math.isnan(standard_error([0.3]))


def test_avg_and_mean_pass_at_k_over_problems():
    rng = random.Random(0)
    correct = [[rng.random() < p for _ in range(6)] for p in (0.1, 0.5, 0.9, 0.0)]
    per_problem_avg = [sum(samples) / 6 for samples in correct]
    estimate = avg_at_n(correct)
    assert estimate.mean == pytest.approx(sum(per_problem_avg) / 4)
    assert estimate.stderr == pytest.approx(statistics.stdev(per_problem_avg) / 2)
    for k in (1, 3, 6):
        per_problem = [float(brute_force_pass_at_k(samples, k)) for samples in correct]
        estimate = mean_pass_at_k(correct, k)
        assert estimate.mean == pytest.approx(statistics.fmean(per_problem))
        assert estimate.stderr == pytest.approx(statistics.stdev(per_problem) / 2)
    assert mean_pass_at_k(correct, 1).mean == pytest.approx(avg_at_n(correct).mean)


def test_mean_pass_at_k_needs_k_samples_everywhere():
    with pytest.raises(ValueError, match="k <= n"):
        mean_pass_at_k([[True, False], [True]], 2)
    with pytest.raises(ValueError, match="no samples"):
        avg_at_n([[True], []])
    with pytest.raises(ValueError, match="No problems"):
        avg_at_n([])


def brute_force_majority(classes):
    """Most frequent non-None class; ties to the earliest first appearance. Returns that first index."""
    counts = {}
    for label in classes:
        if label is not None:
            counts[label] = counts.get(label, 0) + 1
    if not counts:
        return None
    best = max(counts.values())
    for index, label in enumerate(classes):
        if label is not None and counts[label] == best:
            return index


def test_majority_index_against_brute_force():
    rng = random.Random(1)
    for _ in range(300):
        classes = [rng.choice([None, "a", "b", "c"]) for _ in range(rng.randint(1, 7))]
        assert majority_index(classes) == brute_force_majority(classes)


def test_maj_at_n_votes_ties_and_abstentions():
    correct = [
        [False, True, True],  # answers b, a, a: a wins, a is right
        [True, False, False, True],  # a, b, b, a: tie, a appears first
        [False, False],  # nobody answered
        [False, True, False],  # c, a, None: tie c vs a, c first and wrong
    ]
    classes = [["b", "a", "a"], ["a", "b", "b", "a"], [None, None], ["c", "a", None]]
    estimate = maj_at_n(correct, classes)
    scores = [1.0, 1.0, 0.0, 0.0]
    assert estimate.mean == pytest.approx(0.5)
    assert estimate.stderr == pytest.approx(statistics.stdev(scores) / 2)


def test_maj_at_n_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        maj_at_n([[True, False]], [["a"]])


def test_summarize_reports_every_metric_with_its_stderr():
    correct = [[True, False, False, False], [True, True, True, True]]
    classes = [["1", "2", "2", "2"], ["5", "5", "5", "5"]]
    summary = summarize(correct, classes)
    assert default_ks(4) == [1, 2, 4]
    assert default_ks(12) == [1, 2, 4, 8, 12]
    assert set(summary) == {
        f"{name}{suffix}"
        for name in ("avg@4", "pass@1", "pass@2", "pass@4", "maj@4")
        for suffix in ("", "_stderr")
    }
    assert summary["avg@4"] == pytest.approx((0.25 + 1.0) / 2)
    assert summary["pass@2"] == pytest.approx((0.5 + 1.0) / 2)
    assert summary["maj@4"] == pytest.approx(0.5)


def test_the_evaluate_metric_module_loads_from_its_path():
    import evaluate

    from trl_opd.eval import MATH_ACCURACY_METRIC

    metric = evaluate.load(MATH_ACCURACY_METRIC)
    single = metric.compute(
        predictions=["so \\boxed{42}", "\\boxed{1,000}", "no idea"], references=["42", "1000", "7"]
    )
    assert single["accuracy"] == pytest.approx(2 / 3)
    assert single["accuracy_stderr"] == pytest.approx(statistics.stdev([1, 1, 0]) / math.sqrt(3))
    sampled = metric.compute(
        predictions=[["\\boxed{1}", "\\boxed{2}", "\\boxed{2}"], ["\\boxed{3}", "\\boxed{03}", "\\boxed{4}"]],
        references=["2", "3"],
    )
    assert sampled["avg@3"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert sampled["pass@3"] == 1.0 and sampled["maj@3"] == 1.0
