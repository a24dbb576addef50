r"""Grading: \boxed{} extraction, normalisation, the fast path, Math-Verify in bounded worker subprocesses."""

import multiprocessing
import threading
import time

import pytest

from trl_opd.eval.grading import (
    GradingPool,
    answer_classes,
    answer_to_str,
    extract_answer,
    extract_boxed,
    fast_verdict,
    grade,
    grade_many,
    normalize_answer,
)

TIMEOUT = 1.0  # for inputs built to overrun; ordinary answers get the default 5 s (the machine may be busy)


@pytest.fixture(scope="module")
def pool():
    with GradingPool(num_workers=2) as shared:
        yield shared


@pytest.fixture(scope="module")
def short_pool():
    with GradingPool(num_workers=2, timeout=TIMEOUT) as shared:
        yield shared


# --------------------------------------------------------------------------------------------------
# Extraction and normalisation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} and then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
        ("\\boxed {7}", "7"),
        ("\\fbox{3}", "3"),
        ("\\boxed{12", None),
        ("no box", None),
        ("\\boxed 7", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_answer_scores_only_after_the_last_think():
    assert extract_answer("<think>\\boxed{3}</think>Final: \\boxed{5}") == "5"
    assert extract_answer("<think>\\boxed{3}</think>no box after thinking") is None
    assert extract_answer("no think tags \\boxed{4}") == "4"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("025", "25"),
        ("3.50", "3.5"),
        ("-0", "0"),
        ("+7", "7"),
        (142.0, "142"),
        (2.5, "2.5"),
        ("1,000,000", "1000000"),
        ("1{,}000", "1000"),
        ("$5$", "5"),
        ("\\dfrac{3}{4}", "\\frac{3}{4}"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("\\text{Evelyn}", "Evelyn"),
        ("(1,2)", "(1,2)"),  # a tuple, not a thousands separator
        ("5.", "5"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_answer_to_str_keeps_non_integral_floats():
    assert answer_to_str(142.0) == "142"
    assert answer_to_str(0.25) == "0.25"
    assert answer_to_str(" 7 ") == "7"


def test_fast_verdict_decides_only_safe_cases():
    assert fast_verdict("025", "25") is True
    assert fast_verdict("24", "25") is False
    assert fast_verdict("0.5", "\\frac{1}{2}") is None  # Math-Verify's job
    assert fast_verdict("0.3333333", "0.333333") is None  # unequal decimals: Math-Verify rounds
    assert fast_verdict(None, "3") is None


# --------------------------------------------------------------------------------------------------
# Hidden-answer style pairs: (completion, gold, expected)
# --------------------------------------------------------------------------------------------------

TRICKY = [
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{0.5}", "\\frac12", True),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True),
    ("\\boxed{0.333}", "\\frac13", False),
    ("\\boxed{10\\text{ cm}}", "10", True),
    ("\\boxed{10}", "10\\text{ cm}", True),
    ("\\boxed{30^\\circ}", "30", True),
    ("\\boxed{50\\%}", "50", True),
    ("\\boxed{\\$18.90}", "18.90", True),
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{1{,}000}", "1000", True),
    ("\\boxed{1000000}", "1,000,000", True),
    ("\\boxed{1} then \\boxed{2}", "2", True),
    ("\\boxed{1} then \\boxed{2}", "1", False),
    ("The answer is 7", "7", True),
    ("no answer here", "7", False),
    ("\\boxed{\\text{(B)}}", "\\text{(B)}", True),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
    ("\\boxed{025}", "25", True),
    ("\\boxed{25}", "025", True),
    ("\\boxed{142}", 142.0, True),
    ("<think>\\boxed{3}</think> so \\boxed{5}", "5", True),
    ("<think>\\boxed{3}</think> so \\boxed{5}", "3", False),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", True),
    ("\\boxed{\\frac{\\sqrt{3}}{3}}", "\\frac{1}{\\sqrt{3}}", True),
    ("\\boxed{x=3}", "3", True),
    ("\\boxed{3.14}", "\\pi", False),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{(1,2)}", "[1,2]", False),
    ("\\boxed{2\\pi r}", "2 \\pi r", True),
    ("$\\boxed{5}$.", "5", True),
    ("\\boxed{5}", "6", False),
]


def test_tricky_pairs(pool):
    completions, golds, expected = zip(*TRICKY)
    results = grade_many(completions, golds, pool=pool)
    verdicts = [result.correct for result in results]
    wrong = [(c, g) for (c, g, e), v in zip(TRICKY, verdicts) if v != e]
    assert not wrong, f"graded wrongly: {wrong}"
    assert {result.method for result in results} == {"fast", "math_verify"}


def test_fast_path_agrees_with_math_verify(pool):
    """Where the fast path decides, Math-Verify alone gives the same verdict (landscape §4.4 decision 2)."""
    decided = []
    for completion, gold, _ in TRICKY:
        verdict = fast_verdict(extract_answer(completion), gold)
        if verdict is not None:
            decided.append((extract_answer(completion), answer_to_str(gold), verdict))
    assert len(decided) >= 15
    outcomes = pool.run([("verify", [gold, f"\\boxed{{{predicted}}}"]) for predicted, gold, _ in decided])
    disagreements = [(p, g) for (p, g, v), outcome in zip(decided, outcomes) if outcome.value != v]
    assert disagreements == []


def test_require_boxed_counts_unboxed_answers_wrong(pool):
    lenient, strict = (
        grade_many(["The answer is 7"], ["7"], pool=pool, require_boxed=flag)[0] for flag in (False, True)
    )
    assert lenient.correct and not strict.correct and strict.method == "no_answer"


def test_grade_many_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="one answer each"):
        grade_many(["\\boxed{1}"], ["1", "2"])


# --------------------------------------------------------------------------------------------------
# Adversarial completions: graded within the bound, no crash
# --------------------------------------------------------------------------------------------------

ADVERSARIAL = [
    ("\\boxed{" + "9" * 200_000 + "}", "3"),  # a huge integer: fast path, no int() conversion
    ("\\boxed{9^{9^{9^{9}}}+1}", "3"),  # a tower Math-Verify/sympy cannot evaluate in time
    ("\\boxed{" + "\\frac{1}{" * 3000 + "2" + "}" * 3000 + "}", "2"),  # deeply nested LaTeX
    ("x" * 1_000_000 + " the end", "7"),  # a megabyte without a box: only its tail is parsed
    ("\\boxed{" * 50_000 + "1", "1"),  # unbalanced braces
    ("\x00\x01 \\boxed{\udcff}", "1"),  # odd characters
]


def test_adversarial_completions_are_graded_within_the_bound(short_pool):
    started = time.monotonic()
    results = grade_many([c for c, _ in ADVERSARIAL], [g for _, g in ADVERSARIAL], pool=short_pool)
    elapsed = time.monotonic() - started
    assert [result.correct for result in results] == [False] * len(ADVERSARIAL)
    assert results[0].method == "fast"
    assert results[1].timed_out  # reported, and counted wrong
    # Each item is bounded by TIMEOUT and a killed worker restarts; the generous margin only catches a hang
    # (a shared 2-core CI machine can be slow), it is not a speed assertion.
    assert elapsed < len(ADVERSARIAL) * (TIMEOUT + 30.0), elapsed
    # the pool is still usable after killing workers
    assert short_pool.run([("verify", ["2", "\\boxed{2}"])])[0].value is True


def test_megabyte_output_with_a_box_is_fast():
    started = time.monotonic()
    assert grade("y" * 2_000_000 + "\\boxed{1,234}", "1234")
    assert time.monotonic() - started < 30.0  # catches a hang or quadratic work, not a speed target


# --------------------------------------------------------------------------------------------------
# Off the main thread, in worker processes
# --------------------------------------------------------------------------------------------------


def test_grade_off_the_main_thread():
    verdicts, errors = {}, []

    def work(key, completion, gold, timeout=5.0):
        try:
            verdicts[key] = grade(completion, gold, timeout=timeout)
        except Exception as error:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(error)

    threads = [
        threading.Thread(target=work, args=("half", "\\boxed{\\frac{1}{2}}", "0.5")),
        threading.Thread(target=work, args=("wrong", "\\boxed{\\sqrt{2}}", "1.41")),
        threading.Thread(target=work, args=("tower", "\\boxed{9^{9^{9^{9}}}+1}", "3", TIMEOUT)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert verdicts == {"half": True, "wrong": False, "tower": False}


def _grade_in_child(args):
    return grade(*args)


def test_grade_in_a_daemonic_multiprocessing_worker():
    context = multiprocessing.get_context("spawn")
    # multiprocessing.Pool workers are daemonic: they may not start multiprocessing children (subprocesses are fine)
    with context.Pool(1) as workers:
        verdicts = workers.map(_grade_in_child, [("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{2}", "3")])
    assert verdicts == [True, False]


# --------------------------------------------------------------------------------------------------
# Answer classes for majority voting
# --------------------------------------------------------------------------------------------------


def test_answer_classes_merge_equivalent_spellings(pool):
    classes = answer_classes(["1/2", "\\frac{1}{2}", None, "0.5", "3", "03", ""], pool=pool)
    assert classes[0] == classes[1] == classes[3]
    assert classes[4] == classes[5] != classes[0]
    assert classes[2] is None and classes[6] is None


def test_pool_rejects_bad_settings():
    with pytest.raises(ValueError, match="timeout"):
        GradingPool(timeout=0)
    with pytest.raises(ValueError, match="num_workers"):
        GradingPool(num_workers=0)
    with pytest.raises(ValueError, match="Unknown grading task"):
        GradingPool().run([("exec", ["print(1)"])])


def test_a_worker_that_cannot_start_is_reported(monkeypatch):
    monkeypatch.setattr("trl_opd.eval.grading.WORKER_MODULE", "trl_opd.eval.no_such_worker")
    with GradingPool(num_workers=1) as broken, pytest.raises(RuntimeError, match="could not start"):
        broken.run([("verify", ["1", "\\boxed{1}"])])
