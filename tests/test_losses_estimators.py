"""Sampled-token estimators (methods.md §0.6): values, and expected gradients by exact enumeration of ŷ ~ p_S."""

import math

import pytest
import torch

from trl_opd.losses import ESTIMATORS, per_token_divergence, sampled_token_kl, sampled_token_loss


def test_estimator_names():
    assert ESTIMATORS == ("analytic", "sampled_pg", "k2", "k3", "k3_plus")


def test_k_values_match_textbook_formulas():
    student = torch.tensor([-0.2, -1.5, -3.0, -0.7], dtype=torch.float64)
    teacher = torch.tensor([-0.9, -0.4, -3.0, -2.2], dtype=torch.float64)
    for i in range(4):
        ratio = math.exp(teacher[i].item() - student[i].item())
        k1 = -math.log(ratio)
        k2 = 0.5 * math.log(ratio) ** 2
        k3 = (ratio - 1) - math.log(ratio)
        assert sampled_token_kl(student, teacher, "k1")[i].item() == pytest.approx(k1, rel=1e-12, abs=1e-15)
        assert sampled_token_kl(student, teacher, "k2")[i].item() == pytest.approx(k2, rel=1e-12, abs=1e-15)
        assert sampled_token_kl(student, teacher, "k3")[i].item() == pytest.approx(k3, rel=1e-12, abs=1e-15)
    assert (sampled_token_kl(student, teacher, "k3") >= 0).all()


def enumerate_expectation(student_logits, teacher_logits, per_sample):
    """Σ_ŷ sg(p_S(ŷ)) · per_sample(log p_S(ŷ), log p_T(ŷ)) over every vocabulary entry, summed over positions.

    Its gradient is E_{ŷ~p_S}[∇ per_sample] (the sampling distribution itself is not differentiated).
    """
    log_p_s = student_logits.log_softmax(-1)
    log_p_t = teacher_logits.log_softmax(-1)
    values = per_sample(log_p_s, log_p_t)  # every entry treated as the sampled token
    return (log_p_s.exp().detach() * values).sum()


@pytest.mark.parametrize(
    "estimator, expected_divergence",
    [("sampled_pg", "reverse_kl"), ("k2", "reverse_kl"), ("k3_plus", "reverse_kl"), ("k3", "forward_kl")],
)
def test_expected_gradients_equal_analytic_divergence_gradients(estimator, expected_divergence):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    teacher = torch.randn(3, 6, generator=generator, dtype=torch.float64)

    leaf = student.clone().requires_grad_(True)
    enumerate_expectation(leaf, teacher, lambda s, t: sampled_token_loss(s, t, estimator)).backward()
    sampled_gradient = leaf.grad

    leaf = student.clone().requires_grad_(True)
    per_token_divergence(leaf, teacher, divergence=expected_divergence).sum().backward()
    torch.testing.assert_close(sampled_gradient, leaf.grad, rtol=1e-10, atol=1e-12)


def test_k1_has_zero_expected_gradient_but_unbiased_value():
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(2, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, generator=generator, dtype=torch.float64)
    expectation = enumerate_expectation(student, teacher, lambda s, t: sampled_token_kl(s, t, "k1"))
    expectation.backward()
    torch.testing.assert_close(student.grad, torch.zeros_like(student), rtol=0, atol=1e-12)
    reverse_kl = per_token_divergence(student.detach(), teacher).sum()
    torch.testing.assert_close(expectation.detach(), reverse_kl)
    k3_mean = enumerate_expectation(student.detach(), teacher, lambda s, t: sampled_token_kl(s, t, "k3"))
    torch.testing.assert_close(k3_mean, reverse_kl)  # k3 is unbiased too


def test_k3_plus_has_k3_value_and_teacher_gets_no_gradient():
    student = torch.tensor([-0.3, -2.0], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([-1.0, -0.5], dtype=torch.float64, requires_grad=True)
    loss = sampled_token_loss(student, teacher, "k3_plus")
    torch.testing.assert_close(loss.detach(), sampled_token_kl(student, teacher, "k3").detach())
    loss.sum().backward()
    assert teacher.grad is None
    # gradient of k2 = ½ (log p_S − log p_T)² is (log p_S − log p_T)
    torch.testing.assert_close(student.grad, (student - teacher).detach())


def test_sampled_pg_value_and_gradient():
    student = torch.tensor([-0.3, -2.0, -1.1], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([-1.0, -0.5, -1.1], dtype=torch.float64)
    loss = sampled_token_loss(student, teacher, "sampled_pg")
    advantage = teacher - student.detach()
    torch.testing.assert_close(loss.detach(), -advantage * student.detach())
    loss.sum().backward()
    torch.testing.assert_close(student.grad, -advantage)


def test_bad_estimator_and_shapes_raise():
    values = torch.zeros(3)
    with pytest.raises(ValueError, match="estimator"):
        sampled_token_kl(values, values, "k4")
    with pytest.raises(ValueError, match="estimator"):
        sampled_token_loss(values, values, "analytic")
    with pytest.raises(ValueError, match="same shape"):
        sampled_token_loss(values, torch.zeros(4), "k2")
