"""Numerics at the edges: bf16 logits, masked (−inf) vocabulary entries and very peaked distributions give finite
losses and gradients in the pure divergence, the chunked (checkpointed) and fused paths, TIP's scoring pass and the
trainer's entropy log; never NaN.

Masked entries are masked in both models (a vocabulary mask, or padding given −inf bias). A mask on one side only
makes some divergences infinite by definition (reverse KL where the teacher has no mass but the student has,
forward KL the other way round): those give +inf, not NaN, and the bounded ones (JSD, TVD, skew KLs) stay finite.
"""


import pytest
import torch

from trl_opd.losses import (
    OutputHead,
    chunked_entropy,
    DIVERGENCES,
    chunked_token_divergence,
    entropy_from_logits,
    fused_divergence_loss,
    per_token_divergence,
    score_tokens,
)

N, D, V, MASKED = 7, 8, 12, 4


def finite(*tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def logits_pair(kind: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(2, 3, V, generator=generator) * 3
    if kind == "bf16":
        return student.bfloat16(), teacher.bfloat16()
    if kind == "masked":
        student[..., :MASKED] = float("-inf")
        teacher[..., :MASKED] = float("-inf")
    if kind == "peaked":  # logit gaps of 1e4: every other probability underflows to exactly 0
        student, teacher = torch.zeros(3, V), torch.zeros(3, V)
        student[..., 0], teacher[..., 1] = 1e4, 1e4
    return student, teacher


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("kind", ["bf16", "masked", "peaked"])
@pytest.mark.parametrize("options", [{}, {"top_k": 4}, {"top_k": 4, "top_k_tail": True}, {"clip": 0.05}],
                         ids=["full", "top_k", "top_k_tail", "clip"])
def test_per_token_divergence_is_finite(kind, divergence, options):
    if "clip" in options and divergence not in ("forward_kl", "reverse_kl"):
        pytest.skip("the OPSD clip applies to the KLs")
    student, teacher = logits_pair(kind)
    student = student.clone().requires_grad_(True)
    values = per_token_divergence(student, teacher, divergence=divergence, **options)
    values.sum().backward()
    assert finite(values, student.grad)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_entries_equal_the_divergence_on_the_unmasked_vocabulary(divergence):
    student, teacher = logits_pair("masked")
    expected = per_token_divergence(student[..., MASKED:], teacher[..., MASKED:], divergence=divergence)
    torch.testing.assert_close(per_token_divergence(student, teacher, divergence=divergence), expected)


def test_bf16_logits_match_their_float32_values():
    student, teacher = logits_pair("bf16")
    for divergence in DIVERGENCES:
        torch.testing.assert_close(per_token_divergence(student, teacher, divergence=divergence),
                                   per_token_divergence(student.float(), teacher.float(), divergence=divergence))


def test_one_sided_masks_give_inf_where_the_divergence_is_infinite_and_never_nan():
    student, teacher = logits_pair("bf16")
    student, teacher = student.float(), teacher.float()
    teacher_masked = teacher.clone()
    teacher_masked[..., :MASKED] = float("-inf")
    for divergence in DIVERGENCES:
        values = per_token_divergence(student, teacher_masked, divergence=divergence)
        assert not values.isnan().any(), divergence
        assert finite(values) == (divergence != "reverse_kl"), divergence
    student_masked = student.clone()
    student_masked[..., :MASKED] = float("-inf")
    values = per_token_divergence(student_masked, teacher, divergence="forward_kl")
    assert torch.isinf(values).all() and not values.isnan().any()


def head_inputs(kind: str):
    generator = torch.Generator().manual_seed(1)
    student_hidden, teacher_hidden = torch.randn(2, N, D, generator=generator)
    student_head, teacher_head = torch.randn(2, V, D, generator=generator)
    bias = None
    if kind == "bf16":
        student_hidden, teacher_hidden, student_head, teacher_head = (
            t.bfloat16() for t in (student_hidden, teacher_hidden, student_head, teacher_head))
    if kind == "masked":
        bias = torch.zeros(V)
        bias[:MASKED] = float("-inf")
    if kind == "peaked":  # logits of magnitude ~1e3
        student_head, teacher_head = student_head * 300, teacher_head * 300
    return student_hidden, student_head, teacher_hidden, teacher_head, bias


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("kind", ["bf16", "masked", "peaked"])
def test_chunked_and_fused_paths_are_finite_and_agree(kind, divergence):
    student_hidden, student_head, teacher_hidden, teacher_head, bias = head_inputs(kind)
    coefficients = torch.full((N,), 1.0 / N)
    options = {"student_bias": bias, "teacher_bias": bias, "chunk_size": 3, "divergence": divergence}
    hidden_c, head_c = student_hidden.clone().requires_grad_(True), student_head.clone().requires_grad_(True)
    per_token = chunked_token_divergence(hidden_c, head_c, teacher_hidden, teacher_head, **options)
    (coefficients * per_token).sum().backward()
    hidden_f, head_f = student_hidden.clone().requires_grad_(True), student_head.clone().requires_grad_(True)
    loss, fused_per_token, entropy = fused_divergence_loss(hidden_f, head_f, teacher_hidden, teacher_head,
                                                           coefficients, **options)
    loss.backward()
    assert finite(per_token, hidden_c.grad, head_c.grad, loss, fused_per_token, entropy, hidden_f.grad, head_f.grad)
    torch.testing.assert_close(fused_per_token.float(), per_token.detach().float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hidden_f.grad.float(), hidden_c.grad.float(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("kind", ["bf16", "masked", "peaked"])
def test_tip_scores_and_trainer_entropy_are_finite(kind):
    student_hidden, student_head, teacher_hidden, teacher_head, bias = head_inputs(kind)
    scores = score_tokens(student_hidden, student_head, teacher_hidden, teacher_head, student_bias=bias,
                          teacher_bias=bias, chunk_size=3, divergence="reverse_kl", with_forward_kl=True)
    assert finite(*(score for score in scores if score is not None))
    # The trainer's entropy log (was −Σ p·log p, NaN at −inf logits: 0·(−inf)).
    entropy = chunked_entropy(student_hidden, OutputHead(student_head, bias), temperature=0.7, chunk_size=3)
    logits = torch.nn.functional.linear(student_hidden, student_head, bias).float()  # as the trainer: head dtype
    assert finite(entropy) and (entropy >= -1e-6).all()
    torch.testing.assert_close(entropy, entropy_from_logits(logits, 0.7), rtol=1e-3, atol=1e-5)


def test_simct_loss_is_finite_with_entries_masked_on_both_sides():
    from trl_opd.cross_tokenizer import simct_loss

    student, teacher = logits_pair("masked")  # [3, V]: three single-token segments of one row
    student = student.unsqueeze(0).clone().requires_grad_(True)
    ids = torch.tensor([[MASKED, MASKED + 1, MASKED + 2]])
    segments = torch.tensor([[0, k, k + 1, k, k + 1] for k in range(3)])
    shared = (torch.arange(V), torch.arange(V))
    loss = simct_loss(student, teacher.unsqueeze(0), ids, ids, segments, shared)
    loss.sum().backward()
    assert finite(loss, student.grad)
    expected = per_token_divergence(student[0, :, MASKED:].detach(), teacher[:, MASKED:], divergence="reverse_kl")
    torch.testing.assert_close(loss.detach(), expected)
