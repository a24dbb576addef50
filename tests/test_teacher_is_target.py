"""The teacher is a target (methods.md §0.2, sg(·)): every pure loss treats the teacher's side as a constant.

A teacher computed with gradients enabled (easy in self-distillation, where teacher and student are one model) must
never receive a gradient, and the student's gradient must be the one of a detached teacher.
"""

import pytest
import torch

from trl_opd.cross_tokenizer import simct_loss, uld_loss
from trl_opd.losses import (
    DIVERGENCES,
    SAMPLED_KL_ESTIMATORS,
    SAMPLED_LOSS_ESTIMATORS,
    chunked_token_divergence,
    fused_divergence_loss,
    per_token_divergence,
    sampled_token_kl,
    sampled_token_loss,
)
from trl_opd.representation import representation_loss

N, V, D = 6, 11, 5


def leaf(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).requires_grad_()


def student_gradient_and_teacher_gradient(loss_of, student, teacher):
    """(d loss / d student, d loss / d teacher) with the teacher requiring grad, and d loss / d student with the
    teacher detached."""
    loss_of(student, teacher).sum().backward()
    with_graph = student.grad.clone()
    teacher_grad = teacher.grad
    student.grad = None
    loss_of(student, teacher.detach()).sum().backward()
    return with_graph, teacher_grad, student.grad


def assert_teacher_is_a_target(loss_of, student, teacher):
    with_graph, teacher_grad, detached = student_gradient_and_teacher_gradient(loss_of, student, teacher)
    assert teacher_grad is None or bool((teacher_grad == 0).all())
    torch.testing.assert_close(with_graph, detached, rtol=0, atol=0)
    assert with_graph.abs().sum() > 0


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("options", [{}, {"top_k": 4, "top_k_source": "teacher"}, {"top_k": 4, "top_k_tail": True},
                                     {"clip": 0.05}])
def test_per_token_divergence(divergence, options):
    assert_teacher_is_a_target(
        lambda s, t: per_token_divergence(s, t, divergence=divergence, beta=0.3, alpha=0.2, **options),
        leaf(N, V, seed=0), leaf(N, V, seed=1),
    )


@pytest.mark.parametrize("path", ["chunked", "fused"])
def test_chunked_and_fused_paths_from_hidden_states(path):
    """The teacher's hidden states and LM head both require grad here; neither gets any."""
    student_hidden, student_head = leaf(N, D, seed=2), leaf(V, D, seed=3)
    teacher_hidden, teacher_head = leaf(N, D, seed=4), leaf(V, D, seed=5)
    coefficients = torch.full((N,), 1.0 / N, dtype=torch.float64)

    def loss():
        if path == "fused":
            return fused_divergence_loss(student_hidden, student_head, teacher_hidden, teacher_head, coefficients,
                                         chunk_size=4)[0]
        per_token = chunked_token_divergence(student_hidden, student_head, teacher_hidden, teacher_head, chunk_size=4)
        return (coefficients * per_token).sum()

    loss().backward()
    assert teacher_hidden.grad is None and teacher_head.grad is None
    assert student_hidden.grad.abs().sum() > 0 and student_head.grad.abs().sum() > 0


@pytest.mark.parametrize("estimator", SAMPLED_LOSS_ESTIMATORS)
def test_sampled_token_loss(estimator):
    assert_teacher_is_a_target(lambda s, t: sampled_token_loss(s, t, estimator), leaf(N, seed=6), leaf(N, seed=7))


@pytest.mark.parametrize("estimator", SAMPLED_KL_ESTIMATORS)
def test_sampled_token_kl(estimator):
    assert_teacher_is_a_target(lambda s, t: sampled_token_kl(s, t, estimator), leaf(N, seed=8), leaf(N, seed=9))


def test_representation_loss():
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert_teacher_is_a_target(lambda s, t: representation_loss([s], [t], mask), leaf(2, 3, D, seed=10),
                               leaf(2, 3, D, seed=11))


@pytest.mark.parametrize("loss", ["simct", "uld"])
def test_cross_tokenizer_losses(loss):
    """One 1:1 segment per position on two small vocabularies sharing their first four ids."""
    student_ids = torch.tensor([[1, 2, 3]])
    teacher_ids = torch.tensor([[2, 1, 0]])
    segments = torch.tensor([[0, k, k + 1, k, k + 1] for k in range(3)])
    shared = (torch.arange(4), torch.arange(4))

    def loss_of(student_logits, teacher_logits):
        arguments = (student_logits, teacher_logits, student_ids, teacher_ids, segments)
        if loss == "uld":
            return uld_loss(*arguments, reduction="none")
        return simct_loss(*arguments, shared, reduction="none")

    assert_teacher_is_a_target(loss_of, leaf(1, 3, 7, seed=12), leaf(1, 3, 9, seed=13))
