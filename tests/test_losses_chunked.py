"""Chunked paths from hidden states × LM head against per_token_divergence on materialised logits (float64)."""

import pytest
import torch

from trl_opd.losses import (
    DIVERGENCES,
    chunked_token_divergence,
    entropy_from_logits,
    fused_divergence_loss,
    per_token_divergence,
    score_tokens,
    top_k_mass,
)

N, D_S, D_T, V = 7, 4, 5, 13
DIVERGENCE_KEYS = (
    "divergence",
    "beta",
    "alpha",
    "temperature",
    "top_k",
    "top_k_source",
    "clip",
    "top_k_tail",
)


def make_inputs(seed=0, bias=False, vocab_t=V):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    return {
        "student_hidden": randn(N, D_S).requires_grad_(True),
        "student_head": randn(V, D_S).requires_grad_(True),
        "teacher_hidden": randn(N, D_T),
        "teacher_head": randn(vocab_t, D_T),
        "student_bias": randn(V).requires_grad_(True) if bias else None,
        "teacher_bias": randn(vocab_t) if bias else None,
    }


def dense_logits(hidden, head, bias, softcap, vocab_size):
    """Textbook: logits = softcap(h Wᵀ + b), then keep the first vocab_size columns."""
    logits = hidden @ head.T
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits[:, :vocab_size]


def dense_per_token(inputs, softcap=None, teacher_softcap=None, vocab_size=None, **options):
    student = dense_logits(
        inputs["student_hidden"], inputs["student_head"], inputs["student_bias"], softcap, vocab_size
    )
    teacher = dense_logits(
        inputs["teacher_hidden"], inputs["teacher_head"], inputs["teacher_bias"], teacher_softcap, vocab_size
    )
    return per_token_divergence(student, teacher, **options), student


def student_grads(inputs, scalar):
    leaves = [inputs[k] for k in ("student_hidden", "student_head", "student_bias") if inputs[k] is not None]
    return torch.autograd.grad(scalar, leaves)


CASES = [
    {},
    {"divergence": "forward_kl", "temperature": 1.3, "bias": True},
    {"divergence": "jsd", "beta": 0.3, "top_k": 4, "top_k_source": "union"},
    {"divergence": "forward_kl", "clip": 0.05, "softcap": 3.0, "teacher_softcap": 2.0},
    {"divergence": "tvd", "vocab_size": 11, "bias": True},
    {
        "divergence": "skew_forward_kl",
        "alpha": 0.2,
        "top_k": 3,
        "top_k_source": "teacher",
        "top_k_tail": True,
    },
    {"divergence": "skew_reverse_kl", "temperature": 0.7, "vocab_size": 12, "softcap": 4.0},
    {"divergence": "reverse_kl", "top_k": 5, "clip": 0.1, "temperature": 1.1, "bias": True},
    {"divergence": "jsd", "beta": 1.0, "vocab_size": 11, "bias": True, "vocab_t": 15},
    {
        "divergence": "jsd",
        "beta": 0.7,
        "temperature": 0.9,
        "softcap": 3.0,
        "teacher_softcap": 3.0,
        "bias": True,
    },
]


def split_case(case):
    case = dict(case)
    make = {key: case.pop(key) for key in ("bias", "vocab_t") if key in case}
    return make, case


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 10])
def test_chunked_matches_dense(case, chunk_size):
    make, options = split_case(case)
    inputs = make_inputs(seed=chunk_size, **make)
    dense, _ = dense_per_token(inputs, **options)
    chunked = chunked_token_divergence(**inputs, chunk_size=chunk_size, **options)
    torch.testing.assert_close(chunked, dense, rtol=1e-10, atol=1e-12)
    weights = torch.linspace(0.1, 1.0, N, dtype=torch.float64)
    for got, expected in zip(
        student_grads(inputs, (weights * chunked).sum()), student_grads(inputs, (weights * dense).sum())
    ):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunked_every_divergence(divergence):
    inputs = make_inputs(seed=11, bias=True)
    dense, _ = dense_per_token(inputs, divergence=divergence, beta=0.4)
    chunked = chunked_token_divergence(**inputs, chunk_size=3, divergence=divergence, beta=0.4)
    torch.testing.assert_close(chunked, dense, rtol=1e-10, atol=1e-12)
    for got, expected in zip(student_grads(inputs, chunked.sum()), student_grads(inputs, dense.sum())):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunk_size", [2, 7, 9])
def test_fused_matches_dense(case, chunk_size):
    make, options = split_case(case)
    inputs = make_inputs(seed=20 + chunk_size, **make)
    coefficients = torch.rand(N, generator=torch.Generator().manual_seed(chunk_size), dtype=torch.float64)
    coefficients[2] = 0.0  # an unselected token
    dense, student_logits = dense_per_token(inputs, **options)
    dense_loss = (coefficients * dense).sum()
    loss, per_token, entropy = fused_divergence_loss(
        **inputs, coefficients=coefficients, chunk_size=chunk_size, **options
    )
    torch.testing.assert_close(loss, dense_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(per_token, dense.detach(), rtol=1e-10, atol=1e-12)
    assert not per_token.requires_grad and not entropy.requires_grad
    expected_entropy = entropy_from_logits(student_logits.detach(), options.get("temperature", 1.0))
    torch.testing.assert_close(entropy, expected_entropy, rtol=1e-10, atol=1e-12)
    for got, expected in zip(student_grads(inputs, 2.5 * loss), student_grads(inputs, 2.5 * dense_loss)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_every_divergence(divergence):
    inputs = make_inputs(seed=31, bias=True)
    coefficients = torch.full((N,), 1.0 / N, dtype=torch.float64)
    dense, _ = dense_per_token(inputs, divergence=divergence, alpha=0.3)
    dense_loss = (coefficients * dense).sum()
    loss, _, _ = fused_divergence_loss(
        **inputs, coefficients=coefficients, chunk_size=4, divergence=divergence, alpha=0.3
    )
    torch.testing.assert_close(loss, dense_loss, rtol=1e-10, atol=1e-12)
    for got, expected in zip(student_grads(inputs, loss), student_grads(inputs, dense_loss)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_fused_float32_and_frozen_head():
    inputs = make_inputs(seed=40)
    inputs = {k: (v.detach().float() if v is not None else None) for k, v in inputs.items()}
    inputs["student_hidden"].requires_grad_(True)  # head frozen (e.g. LoRA): only the hidden-state gradient
    coefficients = torch.ones(N) / N
    loss, per_token, _ = fused_divergence_loss(**inputs, coefficients=coefficients, chunk_size=3)
    assert loss.dtype == torch.float32 and per_token.dtype == torch.float32
    dense, _ = dense_per_token(inputs)
    (expected,) = torch.autograd.grad((coefficients * dense).sum(), inputs["student_hidden"])
    (got,) = torch.autograd.grad(loss, inputs["student_hidden"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES[:5])
def test_score_tokens_matches_dense(case):
    make, options = split_case(case)
    inputs = make_inputs(seed=50, **make)
    scores = score_tokens(**inputs, chunk_size=3, with_forward_kl=True, **options)
    dense, student_logits = dense_per_token(inputs, **options)
    torch.testing.assert_close(scores.divergence, dense.detach(), rtol=1e-10, atol=1e-12)
    forward_options = {**options, "divergence": "forward_kl"}
    forward, _teacher_logits = dense_per_token(inputs, **forward_options)
    torch.testing.assert_close(scores.forward_kl, forward.detach(), rtol=1e-10, atol=1e-12)
    temperature = options.get("temperature", 1.0)
    torch.testing.assert_close(
        scores.student_entropy, entropy_from_logits(student_logits.detach(), temperature)
    )
    if options.get("top_k") is None:
        assert scores.student_mass is None and scores.teacher_mass is None
    else:
        teacher = dense_logits(
            inputs["teacher_hidden"], inputs["teacher_head"], inputs["teacher_bias"], None, None
        )
        masses = top_k_mass(
            student_logits.detach(),
            teacher,
            top_k=options["top_k"],
            top_k_source=options["top_k_source"],
            temperature=temperature,
        )
        torch.testing.assert_close(scores.student_mass, masses[0])
        torch.testing.assert_close(scores.teacher_mass, masses[1])
    assert not scores.divergence.requires_grad


def test_empty_input_and_bad_arguments():
    inputs = make_inputs()
    empty = {k: (v.detach()[:0] if k.endswith("hidden") else v) for k, v in inputs.items()}
    assert chunked_token_divergence(**empty).shape == (0,)
    loss, per_token, _ = fused_divergence_loss(**empty, coefficients=torch.zeros(0, dtype=torch.float64))
    assert loss.item() == 0.0 and per_token.shape == (0,)
    mismatched = make_inputs(vocab_t=V + 2)
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_token_divergence(**mismatched)
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_token_divergence(**inputs, vocab_size=V + 1)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_divergence(**inputs, chunk_size=0)
    with pytest.raises(ValueError, match="Unknown divergence option"):
        chunked_token_divergence(**inputs, temprature=2.0)
    with pytest.raises(ValueError, match="divergence"):
        fused_divergence_loss(**inputs, coefficients=torch.ones(N), divergence="kl")
    with pytest.raises(ValueError, match="coefficients"):
        fused_divergence_loss(**inputs, coefficients=torch.ones(N + 1))
    with pytest.raises(ValueError, match="softcap"):
        score_tokens(**inputs, softcap=-1.0)
    with pytest.raises(ValueError, match="tokens"):
        chunked_token_divergence(**{**inputs, "teacher_hidden": inputs["teacher_hidden"][:3]})


def test_empty_scoring_keeps_fields():
    inputs = {k: (v.detach()[:0] if k.endswith("hidden") else v) for k, v in make_inputs().items()}
    scores = score_tokens(**inputs, with_forward_kl=True, top_k=3)
    assert (
        scores.divergence.shape == (0,)
        and scores.forward_kl.shape == (0,)
        and scores.student_mass.shape == (0,)
    )


@pytest.mark.parametrize(
    "divergence, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0)]
)
@pytest.mark.parametrize("temperature, softcap", [(1.0, None), (0.8, 2.5)])
def test_closed_form_chunk_equals_autograd_chunk(divergence, beta, temperature, softcap):
    from trl_opd.losses import (
        _autograd_chunk,
        _closed_form_chunk,
        _divergence_options,
        _has_closed_form_gradient,
        OutputHead,
    )

    inputs = make_inputs(seed=60, bias=True)
    student = OutputHead(inputs["student_head"].detach(), inputs["student_bias"].detach(), softcap, vocab_size=V)
    teacher_logits = inputs["teacher_hidden"] @ inputs["teacher_head"].T + inputs["teacher_bias"]
    coefficients = torch.rand(N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    coefficients[[0, 4]] = 0.0
    options = _divergence_options({"divergence": divergence, "beta": beta, "temperature": temperature})
    assert _has_closed_form_gradient(options)
    hidden = inputs["student_hidden"].detach()
    expected = _autograd_chunk(hidden, coefficients, student, teacher_logits, options)
    got = _closed_form_chunk(hidden, coefficients, student, teacher_logits, options)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert (got[3][[0, 4]] == 0).all()  # unselected tokens get no gradient


def test_bfloat16_model_tensors_give_float32_results_close_to_float64():
    inputs = make_inputs(seed=70, bias=True)
    exact, _ = dense_per_token(inputs, divergence="forward_kl")
    half = {k: v.detach().bfloat16().requires_grad_(k.startswith("student")) for k, v in inputs.items()}
    coefficients = torch.ones(N) / N
    chunked = chunked_token_divergence(**half, divergence="forward_kl", chunk_size=3)
    loss, per_token, _ = fused_divergence_loss(**half, coefficients=coefficients, divergence="forward_kl")
    assert chunked.dtype == per_token.dtype == loss.dtype == torch.float32
    torch.testing.assert_close(chunked.double(), exact.detach(), rtol=0.1, atol=0.05)
    torch.testing.assert_close(per_token, chunked.detach())
    grads = torch.autograd.grad(loss, [half["student_hidden"], half["student_head"], half["student_bias"]])
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    reference = torch.autograd.grad(
        chunked.mean(), [half["student_hidden"], half["student_head"], half["student_bias"]]
    )
    for got, expected in zip(grads, reference):
        torch.testing.assert_close(got.float(), expected.float(), rtol=0.05, atol=0.01)


def test_fused_without_gradient_gives_the_same_outputs():
    inputs = make_inputs(seed=80, bias=True)
    coefficients = torch.rand(N, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    options = {"coefficients": coefficients, "chunk_size": 3, "divergence": "jsd", "beta": 0.2, "top_k": 4}
    with_grad = fused_divergence_loss(**inputs, **options)
    with torch.no_grad():
        without = fused_divergence_loss(**inputs, **options)
    assert not without[0].requires_grad
    for a, b in zip(without, with_grad):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-14)
