"""Parity of trl_opd.losses with TRL's own GKD loss and chunked divergence kernel (uniform-weight paths)."""

import pytest
import torch

from trl_opd.losses import (
    chunked_token_divergence,
    divergence_from_trl_beta,
    fused_divergence_loss,
    per_token_divergence,
    token_loss_coefficients,
)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.9])
def test_matches_trl_generalized_jsd_loss(beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    generator = torch.Generator().manual_seed(int(beta * 10))
    student = 3 * torch.randn(2, 5, 17, generator=generator, dtype=torch.float64)
    teacher = 3 * torch.randn(2, 5, 17, generator=generator, dtype=torch.float64)
    trl_elementwise = GKDTrainer.generalized_jsd_loss(
        student, teacher, beta=beta, temperature=temperature, reduction="none"
    )
    ours = per_token_divergence(
        student, teacher, divergence=divergence_from_trl_beta(beta), beta=beta, temperature=temperature
    )
    torch.testing.assert_close(ours, trl_elementwise.sum(-1), rtol=1e-10, atol=1e-12)


def trl_inputs(seed, bias):
    generator = torch.Generator().manual_seed(seed)
    n, d_s, d_t, vocab = 9, 8, 6, 40
    return {
        "student_hidden": torch.randn(n, d_s, generator=generator).requires_grad_(True),
        "student_head": torch.randn(vocab, d_s, generator=generator).requires_grad_(True),
        "student_bias": torch.randn(vocab, generator=generator).requires_grad_(True) if bias else None,
        "teacher_hidden": torch.randn(n, d_t, generator=generator),
        "teacher_head": torch.randn(vocab, d_t, generator=generator),
        "teacher_bias": torch.randn(vocab, generator=generator) if bias else None,
    }


def student_grads(inputs, scalar):
    leaves = [inputs[k] for k in ("student_hidden", "student_head", "student_bias") if inputs[k] is not None]
    return torch.autograd.grad(scalar, leaves)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("bias, softcap, temperature", [(False, None, 1.0), (True, 5.0, 0.8)])
def test_chunked_and_fused_match_trl_chunked_divergence_function(beta, bias, softcap, temperature):
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    inputs = trl_inputs(seed=int(beta * 10), bias=bias)
    trl_per_token, trl_entropy = ChunkedDivergenceFunction.apply(
        inputs["student_hidden"],
        inputs["student_head"],
        inputs["student_bias"],
        inputs["teacher_hidden"],
        inputs["teacher_head"],
        inputs["teacher_bias"],
        beta,
        temperature,
        1.0,
        softcap,
        1.0,
        softcap,
    )
    options = {
        "divergence": divergence_from_trl_beta(beta),
        "beta": beta,
        "temperature": temperature,
        "softcap": softcap,
        "teacher_softcap": softcap,
        "chunk_size": 4,
    }
    ours = chunked_token_divergence(**inputs, **options)
    torch.testing.assert_close(ours, trl_per_token, rtol=1e-4, atol=1e-5)
    weights = torch.linspace(0.2, 1.0, ours.shape[0])
    expected_grads = student_grads(inputs, (weights * trl_per_token).sum())
    for got, expected in zip(student_grads(inputs, (weights * ours).sum()), expected_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    loss, per_token, entropy = fused_divergence_loss(**inputs, coefficients=weights, **options)
    torch.testing.assert_close(per_token, trl_per_token.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(entropy, trl_entropy, rtol=1e-4, atol=1e-5)
    for got, expected in zip(student_grads(inputs, loss), expected_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_fused_token_mean_matches_trl_chunked_divergence_loss():
    # TRL's trainer-level reduction returns (Σ ℓ / num_items, Σ entropy, count) over the masked positions.
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    inputs = trl_inputs(seed=3, bias=False)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    num_items = torch.tensor(12.0)  # N_step of a larger optimizer step
    shaped = {k: inputs[k].reshape(3, 3, -1) for k in ("student_hidden", "teacher_hidden")}
    trl_loss, trl_entropy_sum, trl_count = _chunked_divergence_loss(
        shaped["student_hidden"],
        shaped["teacher_hidden"],
        inputs["student_head"],
        inputs["teacher_head"],
        mask,
        beta=0.5,
        num_items_in_batch=num_items,
    )
    coefficients = token_loss_coefficients(mask, reduction="token_mean", num_items=num_items).reshape(-1)
    loss, _, entropy = fused_divergence_loss(**inputs, coefficients=coefficients, divergence="jsd", beta=0.5)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropy[mask.reshape(-1).bool()].sum(), trl_entropy_sum, rtol=1e-5, atol=1e-5)
    assert trl_count.item() == mask.sum().item()
    for got, expected in zip(student_grads(inputs, loss), student_grads(inputs, trl_loss)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
