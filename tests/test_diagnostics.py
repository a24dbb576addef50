"""trl_opd.diagnostics against a loop over positions with Python sets (methods.md §7.1)."""

import math
import sys

import pytest
import torch

from trl_opd.diagnostics import OVERLAP_KEYS, OverlapAccumulator, overlap_stats, plot_diagnostics


def softmax(logits, temperature):
    scaled = [z / temperature for z in logits]
    top = max(scaled)
    exps = [math.exp(z - top) for z in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def entropy(probs):
    return -sum(p * math.log(p) for p in probs if p > 0)


def reference_overlap_stats(student_logits, teacher_logits, mask, k, temperature):
    """Textbook §7.1 definitions: loop over valid positions, top-k as Python sets."""
    sums = dict.fromkeys(OVERLAP_KEYS, 0.0)
    count = overlapping = entries = 0
    for b, row in enumerate(mask):
        for t, valid in enumerate(row):
            if not valid:
                continue
            p_s = softmax(student_logits[b][t], temperature)
            p_t = softmax(teacher_logits[b][t], temperature)
            vocab = range(len(p_s))
            top_s = set(sorted(vocab, key=lambda v: -p_s[v])[:k])
            top_t = set(sorted(vocab, key=lambda v: -p_t[v])[:k])
            shared = top_s & top_t
            count += 1
            sums["overlap_ratio"] += len(shared) / k
            sums["student_overlap_mass"] += sum(p_s[v] for v in shared)
            sums["teacher_overlap_mass"] += sum(p_t[v] for v in shared)
            sums["entropy_gap"] += abs(entropy(p_t) - entropy(p_s))
            if shared:
                overlapping += 1
                z_s = sum(p_s[v] for v in shared)
                z_t = sum(p_t[v] for v in shared)
                sums["overlap_advantage"] += sum(
                    p_s[v] / z_s * (math.log(p_t[v] / z_t) - math.log(p_s[v] / z_s)) for v in shared
                ) / len(shared)
            # The authors' code: raw log-ratios of every intersection entry, pooled over positions.
            entries += len(shared)
            sums["overlap_advantage_pooled"] += sum(math.log(p_t[v]) - math.log(p_s[v]) for v in shared)
    stats = {key: value / count for key, value in sums.items()}
    stats["overlap_advantage"] = sums["overlap_advantage"] / overlapping
    stats["overlap_advantage_pooled"] = sums["overlap_advantage_pooled"] / entries
    return stats, count


def logits_with_disjoint_positions(seed, rows=3, width=7, vocab=12, k=3):
    """Random logits where some positions have disjoint student/teacher top-k (empty I_t)."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, width, vocab, generator=generator, dtype=torch.float64) * 2
    teacher = student + torch.randn(rows, width, vocab, generator=generator, dtype=torch.float64)
    student[0, 1, :k] += 20.0  # the student is sure of tokens 0..k-1,
    teacher[0, 1, -k:] += 20.0  # the teacher of the last k tokens: I_t is empty here.
    student[1, 2, :k] += 20.0
    teacher[1, 2, -k:] += 20.0
    mask = torch.ones(rows, width, dtype=torch.bool)
    mask[0, :2] = False  # left padding hides (0, 1)
    mask[-1, 5:] = False  # right padding
    return student, teacher, mask


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_overlap_stats_matches_brute_force(chunk_size, temperature):
    student, teacher, mask = logits_with_disjoint_positions(0)
    lists = student.tolist(), teacher.tolist(), mask.tolist()
    expected, count = reference_overlap_stats(*lists, 3, temperature)
    got = overlap_stats(student, teacher, mask, k=3, temperature=temperature, chunk_size=chunk_size)
    assert got["num_tokens"] == count == mask.sum().item()
    for key in OVERLAP_KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key


def test_overlap_advantage_skips_empty_intersections():
    student, teacher, mask = logits_with_disjoint_positions(1)
    mask[0, :2] = True  # now position (0, 1), with an empty I_t, is valid
    expected, _ = reference_overlap_stats(student.tolist(), teacher.tolist(), mask.tolist(), 3, 1.0)
    got = overlap_stats(student, teacher, mask, k=3)
    assert got["overlap_advantage"] == pytest.approx(expected["overlap_advantage"], rel=1e-9)
    # A version that averaged zeros over every position would be smaller in magnitude.
    diluted = expected["overlap_advantage"] * (mask.sum().item() - 2) / mask.sum().item()
    assert got["overlap_advantage"] != pytest.approx(diluted, rel=1e-6)


def test_overlap_stats_identical_models_and_float32():
    logits = torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(2))
    got = overlap_stats(logits, logits.clone(), torch.ones(2, 6), k=16)
    assert got["overlap_ratio"] == pytest.approx(1.0)
    assert got["student_overlap_mass"] == pytest.approx(got["teacher_overlap_mass"], rel=1e-6)
    assert got["entropy_gap"] == pytest.approx(0.0, abs=1e-6)
    assert got["overlap_advantage"] == pytest.approx(0.0, abs=1e-7)
    assert all(isinstance(got[key], float) for key in OVERLAP_KEYS)


def test_overlap_stats_without_autograd_and_on_non_contiguous_logits():
    student = torch.randn(2, 9, 20, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 9, 20, dtype=torch.float64)
    sliced_student, sliced_teacher = student[:, 1:-1], teacher[:, 1:-1]  # as sliced from model outputs
    mask = torch.ones(2, 7, dtype=torch.bool)
    got = overlap_stats(sliced_student, sliced_teacher, mask, k=4, chunk_size=3)
    lists = sliced_student.tolist(), sliced_teacher.tolist(), mask.tolist()
    expected, _ = reference_overlap_stats(*lists, 4, 1.0)
    assert got["student_overlap_mass"] == pytest.approx(expected["student_overlap_mass"], rel=1e-9)
    assert student.grad is None and torch.is_grad_enabled()


def test_accumulator_fed_chunk_by_chunk_equals_whole_batch():
    student, teacher, mask = logits_with_disjoint_positions(3, rows=2, width=10)
    whole = overlap_stats(student, teacher, mask, k=3, temperature=1.3)
    accumulator = OverlapAccumulator(k=3, temperature=1.3)
    for start in range(0, 10, 3):  # chunks of 3 positions along T, with their masks: 3 does not divide 10
        end = start + 3
        accumulator.update(student[:, start:end], teacher[:, start:end], mask[:, start:end])
    chunked = accumulator.compute()
    assert chunked == pytest.approx(whole, rel=1e-12)
    # Summed totals of two "ranks" give the statistics of the union of their tokens.
    first, second = OverlapAccumulator(k=3, temperature=1.3), OverlapAccumulator(k=3, temperature=1.3)
    first.update(student[0], teacher[0], mask[0])
    second.update(student[1], teacher[1], mask[1])
    first.totals = first.totals + second.totals
    assert first.compute() == pytest.approx(whole, rel=1e-12)


def test_empty_inputs_give_nan_and_zero_count():
    logits = torch.randn(2, 3, 8)
    got = overlap_stats(logits, logits, torch.zeros(2, 3), k=2)
    assert got["num_tokens"] == 0
    assert all(math.isnan(got[key]) for key in OVERLAP_KEYS)
    assert OverlapAccumulator(k=2).compute()["num_tokens"] == 0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s, t, m: overlap_stats(s, t, m, k=9), "k=9 exceeds the vocabulary size"),
        (lambda s, t, m: overlap_stats(s, t, m, k=0), "k must be a positive integer"),
        (lambda s, t, m: overlap_stats(s, t, m, temperature=0.0), "temperature must be > 0"),
        (lambda s, t, m: overlap_stats(s, t[..., :7], m, k=2), "must have the same shape"),
        (lambda s, t, m: overlap_stats(s, t, m[:, :2], k=2), "mask"),
        (lambda s, t, m: overlap_stats(s, t, m, k=2, chunk_size=0), "chunk_size"),
        (lambda s, t, m: OverlapAccumulator(k=2).update(s, t, m[:, :2]), "leading shape"),
    ],
)
def test_bad_input(call, message):
    logits = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=message):
        call(logits, logits.clone(), torch.ones(2, 3))


# ---------------------------------------------------------------------------------------------------------
# plot_diagnostics
# ---------------------------------------------------------------------------------------------------------


def test_plot_diagnostics_writes_one_png_per_diagnostic(tmp_path):
    history = [
        {"loss": 1.0, "step": 1, "diagnostics/overlap_ratio": 0.5, "train/entropy_gap": 0.3},
        {"loss": 0.9, "step": 2, "diagnostics/overlap_ratio": 0.6, "diagnostics/tip_q1": 0.25},
        {"eval_loss": 0.8, "step": 2, "train/entropy_gap": 0.2, "diagnostics/flag": True},
        {"train_runtime": 3.0, "step": 3},
    ]
    paths = plot_diagnostics(history, tmp_path / "plots")
    names = sorted(path.rsplit("/", 1)[-1] for path in paths)
    assert names == ["diagnostics_overlap_ratio.png", "diagnostics_tip_q1.png", "train_entropy_gap.png"]
    for path in paths:
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert plot_diagnostics([{"loss": 1.0}], tmp_path / "none") == []


def test_plot_diagnostics_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="log_history must be a list of dicts"):
        plot_diagnostics("history", tmp_path)
    with pytest.raises(ValueError, match=r"log_history\[1\]"):
        plot_diagnostics([{"step": 1}, 3], tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install 'trl_opd\\[plot\\]'"):
        plot_diagnostics([], tmp_path)


def test_update_returns_the_student_entropy_of_the_valid_positions():
    student, teacher, mask = logits_with_disjoint_positions(4, rows=2, width=5)
    returned = OverlapAccumulator(k=3, temperature=0.7).update(student, teacher, mask)
    expected = [entropy(softmax(student[b, t].tolist(), 0.7)) for b in range(2) for t in range(5) if mask[b, t]]
    assert returned.tolist() == pytest.approx(expected, rel=1e-12)
    assert OverlapAccumulator(k=3).update(student, teacher, torch.zeros(2, 5)).shape == (0,)
