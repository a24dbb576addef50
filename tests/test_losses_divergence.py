"""per_token_divergence against brute-force formulas (methods.md §0.3–0.5, §1), written with Python loops."""

import math

import pytest
import torch

from trl_opd.losses import (
    DIVERGENCES,
    divergence_from_trl_beta,
    entropy_from_logits,
    per_token_divergence,
    top_k_mass,
)

NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------------------
# Brute-force reference: plain Python floats, one position at a time
# --------------------------------------------------------------------------------------------------------


def softmax(values):
    finite = [v for v in values if v != NEG_INF]
    top = max(finite)
    exps = [0.0 if v == NEG_INF else math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def kl_term(p, q):
    """p log(p / q) with 0 log 0 = 0."""
    return 0.0 if p == 0.0 else p * math.log(p / q)


def entry(p_s, p_t, divergence, beta, alpha):
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        return kl_term(p_t, p_s)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        return kl_term(p_s, p_t)
    if divergence == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        return beta * kl_term(p_t, m) + (1 - beta) * kl_term(p_s, m)
    if divergence == "tvd":
        return 0.5 * abs(p_t - p_s)
    if divergence == "skew_forward_kl":
        return kl_term(p_t, alpha * p_t + (1 - alpha) * p_s)
    return kl_term(p_s, (1 - alpha) * p_t + alpha * p_s)


def top_indices(values, k):
    return sorted(range(len(values)), key=lambda v: -values[v])[:k]


def reference_row(
    z_s,
    z_t,
    divergence="reverse_kl",
    beta=0.5,
    alpha=0.1,
    temperature=1.0,
    top_k=None,
    top_k_source="student",
    clip=None,
    top_k_tail=False,
):
    z_s = [v / temperature for v in z_s]
    z_t = [v / temperature for v in z_t]
    if top_k is None:
        p_s, p_t = softmax(z_s), softmax(z_t)
    else:
        support = {
            "student": set(top_indices(z_s, top_k)),
            "teacher": set(top_indices(z_t, top_k)),
            "union": set(top_indices(z_s, top_k)) | set(top_indices(z_t, top_k)),
        }[top_k_source]
        support = sorted(support)
        if top_k_tail:
            full_s, full_t = softmax(z_s), softmax(z_t)
            outside = [v for v in range(len(z_s)) if v not in support]
            p_s = [full_s[v] for v in support] + [sum(full_s[v] for v in outside)]
            p_t = [full_t[v] for v in support] + [sum(full_t[v] for v in outside)]
        else:
            p_s = softmax([z_s[v] for v in support])
            p_t = softmax([z_t[v] for v in support])
    total = 0.0
    for a, b in zip(p_s, p_t):
        value = entry(a, b, divergence, beta, alpha)
        total += value if clip is None else min(value, clip)
    return total


def reference(student, teacher, **options):
    flat_s = student.reshape(-1, student.shape[-1]).tolist()
    flat_t = teacher.reshape(-1, teacher.shape[-1]).tolist()
    values = [reference_row(a, b, **options) for a, b in zip(flat_s, flat_t)]
    return torch.tensor(values, dtype=torch.float64).reshape(student.shape[:-1])


def random_logits(*shape, scale=2.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=generator, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_full_vocabulary_matches_brute_force(divergence, temperature):
    student, teacher = random_logits(2, 3, 9, seed=1), random_logits(2, 3, 9, seed=2)
    options = {"divergence": divergence, "beta": 0.3, "alpha": 0.2, "temperature": temperature}
    got = per_token_divergence(student, teacher, **options)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, reference(student, teacher, **options), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_beta_endpoints_and_interior(beta):
    student, teacher = random_logits(4, 8, seed=3), random_logits(4, 8, seed=4)
    got = per_token_divergence(student, teacher, divergence="jsd", beta=beta)
    torch.testing.assert_close(
        got, reference(student, teacher, divergence="jsd", beta=beta), rtol=1e-10, atol=1e-12
    )
    if beta in (0.0, 1.0):
        same = per_token_divergence(student, teacher, divergence=divergence_from_trl_beta(beta))
        torch.testing.assert_close(got, same, rtol=0, atol=0)


@pytest.mark.parametrize("source", ["student", "teacher", "union"])
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_reverse_kl"])
def test_top_k_matches_brute_force(source, tail, divergence):
    student, teacher = random_logits(3, 2, 12, seed=5), random_logits(3, 2, 12, seed=6)
    options = {
        "divergence": divergence,
        "beta": 0.4,
        "temperature": 1.1,
        "top_k": 4,
        "top_k_source": source,
        "top_k_tail": tail,
    }
    got = per_token_divergence(student, teacher, **options)
    torch.testing.assert_close(got, reference(student, teacher, **options), rtol=1e-10, atol=1e-12)


def test_union_support_counts_shared_indices_once():
    # Identical orderings: the union is exactly the top-k, so it must equal the student's top-k divergence.
    student = random_logits(5, 10, seed=7)
    teacher = 0.5 * student + 0.1  # same ranking, different distribution
    union = per_token_divergence(student, teacher, top_k=3, top_k_source="union")
    single = per_token_divergence(student, teacher, top_k=3, top_k_source="student")
    torch.testing.assert_close(union, single, rtol=1e-12, atol=1e-12)
    assert (union > 0).all()


def test_top_k_at_least_vocabulary_is_full_vocabulary():
    student, teacher = random_logits(3, 6, seed=8), random_logits(3, 6, seed=9)
    full = per_token_divergence(student, teacher)
    for source in ("student", "union"):
        restricted = per_token_divergence(student, teacher, top_k=6, top_k_source=source)
        torch.testing.assert_close(restricted, full, rtol=1e-12, atol=1e-12)
        with_tail = per_token_divergence(student, teacher, top_k=9, top_k_source=source, top_k_tail=True)
        torch.testing.assert_close(with_tail, full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_clip_caps_each_vocabulary_entry_before_the_sum(divergence):
    student, teacher = random_logits(4, 10, scale=3.0, seed=10), random_logits(4, 10, scale=3.0, seed=11)
    options = {"divergence": divergence, "clip": 0.05}
    got = per_token_divergence(student, teacher, **options)
    torch.testing.assert_close(got, reference(student, teacher, **options), rtol=1e-10, atol=1e-12)
    unclipped = per_token_divergence(student, teacher, divergence=divergence)
    per_token_clip = unclipped.clamp(max=0.05)
    assert not torch.allclose(got, per_token_clip), "clip must act per vocabulary entry, not on the token sum"
    assert (got <= unclipped + 1e-12).all()


def test_clipped_forward_kl_can_be_negative():
    # Entry-wise forward-KL terms are negative where p_T < p_S; capping the positive ones exposes them.
    student = torch.tensor([[3.0, 0.0, 0.0]], dtype=torch.float64)
    teacher = torch.tensor([[0.0, 3.0, 0.0]], dtype=torch.float64)
    got = per_token_divergence(student, teacher, divergence="forward_kl", clip=0.01)
    assert got.item() < 0
    torch.testing.assert_close(got, reference(student, teacher, divergence="forward_kl", clip=0.01))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_vocabulary_entries_are_finite(divergence):
    student, teacher = random_logits(2, 3, 8, seed=12), random_logits(2, 3, 8, seed=13)
    student[..., [2, 5]] = NEG_INF
    teacher[..., [2, 5]] = NEG_INF
    for options in (
        {},
        {"top_k": 7, "top_k_source": "union"},
        {"top_k": 3, "top_k_tail": True},
        {"clip": 0.1},
    ):
        leaf = student.clone().requires_grad_(True)
        got = per_token_divergence(leaf, teacher, divergence=divergence, beta=0.3, **options)
        expected = reference(student, teacher, divergence=divergence, beta=0.3, **options)
        torch.testing.assert_close(got.detach(), expected, rtol=1e-10, atol=1e-12)
        got.sum().backward()
        assert torch.isfinite(leaf.grad).all()
        assert (leaf.grad[..., [2, 5]] == 0).all()


def test_half_precision_inputs_are_computed_and_returned_in_float32():
    student, teacher = random_logits(3, 50, seed=14), random_logits(3, 50, seed=15)
    got = per_token_divergence(student.bfloat16(), teacher.bfloat16())
    assert got.dtype == torch.float32
    expected = per_token_divergence(student.bfloat16().double(), teacher.bfloat16().double())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert per_token_divergence(student.float(), teacher.float()).dtype == torch.float32


# --------------------------------------------------------------------------------------------------------
# Properties (methods.md §0.3, §1)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_identical_distributions_give_zero(divergence):
    logits = random_logits(4, 7, seed=16)
    got = per_token_divergence(logits, logits.clone(), divergence=divergence, beta=0.3)
    torch.testing.assert_close(got, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-14)
    uniform = torch.zeros(2, 7, dtype=torch.float64)
    assert per_token_divergence(uniform, uniform, divergence=divergence).abs().max() < 1e-14


def test_jsd_half_is_symmetric_and_bounded_by_binary_entropy():
    student, teacher = random_logits(6, 9, scale=4.0, seed=17), random_logits(6, 9, scale=4.0, seed=18)
    forward = per_token_divergence(student, teacher, divergence="jsd", beta=0.5)
    swapped = per_token_divergence(teacher, student, divergence="jsd", beta=0.5)
    torch.testing.assert_close(forward, swapped, rtol=1e-12, atol=1e-14)
    for beta in (0.2, 0.5, 0.8):
        binary_entropy = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        far_apart = 30.0 * torch.eye(9, dtype=torch.float64)[:5]
        value = per_token_divergence(far_apart, far_apart.roll(1, dims=-1), divergence="jsd", beta=beta)
        assert (value <= binary_entropy + 1e-12).all()
        assert value.max() > 0.99 * binary_entropy  # nearly disjoint supports approach the bound


def test_skew_divergences_bounded_and_tvd_at_most_one():
    student, teacher = random_logits(5, 9, scale=8.0, seed=19), random_logits(5, 9, scale=8.0, seed=20)
    for divergence in ("skew_forward_kl", "skew_reverse_kl"):
        value = per_token_divergence(student, teacher, divergence=divergence, alpha=0.1)
        assert (value >= -1e-14).all() and (value <= math.log(10) + 1e-12).all()
        # alpha = 0 removes the skew
        plain = "forward_kl" if divergence == "skew_forward_kl" else "reverse_kl"
        torch.testing.assert_close(
            per_token_divergence(student, teacher, divergence=divergence, alpha=0.0),
            per_token_divergence(student, teacher, divergence=plain),
        )
    tvd = per_token_divergence(student, teacher, divergence="tvd")
    assert (tvd >= 0).all() and (tvd <= 1 + 1e-12).all()


def test_divergence_from_trl_beta():
    assert divergence_from_trl_beta(0) == "forward_kl"
    assert divergence_from_trl_beta(1.0) == "reverse_kl"
    assert divergence_from_trl_beta(0.5) == "jsd"
    with pytest.raises(ValueError, match="beta"):
        divergence_from_trl_beta(1.5)


def test_entropy_and_top_k_mass_against_formulas():
    logits = random_logits(3, 8, seed=21)
    logits[0, 3] = NEG_INF
    for temperature in (1.0, 0.6):
        expected = []
        for row in logits.tolist():
            probs = softmax([v / temperature for v in row])
            expected.append(-sum(p * math.log(p) for p in probs if p > 0))
        torch.testing.assert_close(
            entropy_from_logits(logits, temperature), torch.tensor(expected, dtype=torch.float64)
        )
    teacher = random_logits(3, 8, seed=22)
    student_mass, teacher_mass = top_k_mass(logits, teacher, top_k=2, top_k_source="union", temperature=0.8)
    for row, (z_s, z_t) in enumerate(zip(logits.tolist(), teacher.tolist())):
        support = set(top_indices(z_s, 2)) | set(top_indices(z_t, 2))
        p_s, p_t = softmax([v / 0.8 for v in z_s]), softmax([v / 0.8 for v in z_t])
        assert student_mass[row].item() == pytest.approx(sum(p_s[v] for v in support), rel=1e-12)
        assert teacher_mass[row].item() == pytest.approx(sum(p_t[v] for v in support), rel=1e-12)


# --------------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_kl_gradients_match_closed_forms(temperature):
    # methods.md §1: dFKL/dz_S = (p_S - p_T)/T ; dRKL/dz_S(v) = p_S(v)[log p_S(v) - log p_T(v) - RKL]/T
    student, teacher = random_logits(4, 9, seed=23), random_logits(4, 9, seed=24)
    log_p_s = (student / temperature).log_softmax(-1)
    log_p_t = (teacher / temperature).log_softmax(-1)
    p_s, p_t = log_p_s.exp(), log_p_t.exp()
    rkl = (p_s * (log_p_s - log_p_t)).sum(-1, keepdim=True)
    closed_forms = {
        "forward_kl": (p_s - p_t) / temperature,
        "reverse_kl": p_s * (log_p_s - log_p_t - rkl) / temperature,
    }
    for divergence, expected in closed_forms.items():
        leaf = student.clone().requires_grad_(True)
        per_token_divergence(leaf, teacher, divergence=divergence, temperature=temperature).sum().backward()
        torch.testing.assert_close(leaf.grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"temperature": 0.8, "clip": 0.08},
        {"top_k": 3, "top_k_source": "union"},
        {"top_k": 3, "top_k_tail": True},
    ],
)
def test_gradients_agree_with_finite_differences(divergence, options):
    student, teacher = random_logits(2, 7, seed=25), random_logits(2, 7, seed=26)
    student.requires_grad_(True)

    def function(z):
        return per_token_divergence(z, teacher, divergence=divergence, beta=0.3, alpha=0.2, **options)

    assert torch.autograd.gradcheck(function, (student,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_top_k_support_indices_carry_no_gradient_to_the_teacher_choice():
    # With teacher-sourced support the student's gradient outside the support must be exactly zero.
    student, teacher = random_logits(3, 10, seed=27), random_logits(3, 10, seed=28)
    leaf = student.clone().requires_grad_(True)
    per_token_divergence(leaf, teacher, top_k=4, top_k_source="teacher").sum().backward()
    outside = torch.ones_like(student, dtype=torch.bool).scatter(-1, teacher.topk(4, dim=-1).indices, False)
    assert (leaf.grad[outside] == 0).all()
    assert (leaf.grad[~outside] != 0).any()


# --------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"divergence": "kl"}, "divergence"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"temperature": 0.0}, "temperature"),
        ({"beta": -0.1}, "beta"),
        ({"alpha": 1.1}, "alpha"),
        ({"clip": 0.0}, "clip"),
        ({"top_k": 2, "top_k_source": "both"}, "top_k_source"),
    ],
)
def test_bad_options_raise_value_errors(options, message):
    logits = random_logits(2, 5, seed=29)
    with pytest.raises(ValueError, match=message):
        per_token_divergence(logits, logits, **options)


def test_shape_mismatches_raise_value_errors():
    with pytest.raises(ValueError, match="vocabulary sizes differ"):
        per_token_divergence(random_logits(2, 5), random_logits(2, 6))
    with pytest.raises(ValueError, match="same shape"):
        per_token_divergence(random_logits(2, 5), random_logits(3, 5))
