"""No accepted config trains nothing (issue 16, item 1): for every setting of the loss-shaping fields that
`OPDConfig` accepts, the objective's gradient with respect to the student's hidden states is not identically zero
on generic inputs. The known traps are refused at construction instead: a top-1 support renormalised on its one
token (both distributions are 1 there, methods.md §0.5) and a skewed KL with α = 1 (it compares a distribution with
itself, §1.2).

"Generic inputs" hold both kinds of positions a run sees: a student far from the teacher and one close to it. The
OPSD clip zeroes the gradient of a position whose every support entry exceeds τ (by design, §2.1), which with TVD or
JSD (entries ≥ 0) on a support of one or two tokens is every far position; it never zeroes a close one.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from trl_opd import OPDConfig
from trl_opd.losses import OutputHead, per_token_divergence
from trl_opd.objective import CompletionBatch, LocalTeacher, OPDObjective
from trl_opd.reduction import StepNormalisers

VOCAB, HIDDEN, ROWS, COLUMNS = 8, 5, 2, 3
SEEDS = (0, 1, 2)
ESTIMATORS = ("analytic", "sampled_pg", "k2", "k3", "k3_plus")
DIVERGENCES = [
    ("reverse_kl", {}), ("forward_kl", {}), ("tvd", {}),
    *[("jsd", {"beta": beta}) for beta in (0.0, 0.5, 1.0)],
    *[(name, {"alpha": alpha}) for name in ("skew_forward_kl", "skew_reverse_kl") for alpha in (0.0, 0.1, 1.0)],
]
SUPPORTS = [{}] + [
    {"loss_top_k": k, "loss_top_k_source": source, "loss_top_k_tail": tail}
    for k, source, tail in itertools.product((1, 2, VOCAB), ("student", "teacher", "union"), (False, True))
]
SHAPES = [dict(support, **extra) for support in SUPPORTS for extra in (
    {}, {"clip": 0.05}, {"distillation_temperature": 0.5}, {"clip": 0.05, "distillation_temperature": 2.0})]


def accepted(**settings) -> OPDConfig | None:
    try:
        return OPDConfig(output_dir="zero-gradient-unused", use_cpu=True, report_to="none", **settings)
    except ValueError:
        return None


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is ~30x faster on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_batch(seed: int) -> CompletionBatch:
    """Random student states and head (logits of order 1), every token supervised, random sampled tokens. The
    teacher's head is the identity, so its states are its logits: row 0's are independent of the student's, row 1's
    are the student's plus noise of 0.05 (close)."""
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    student_hidden, student_head = randn(ROWS, COLUMNS, HIDDEN), randn(VOCAB, HIDDEN)
    teacher_logits = randn(ROWS, COLUMNS, VOCAB)
    teacher_logits[1] = student_hidden[1] @ student_head.T + 0.05 * teacher_logits[1]
    return CompletionBatch(
        valid=torch.ones(ROWS, COLUMNS, dtype=torch.bool),
        completion_ids=torch.randint(0, VOCAB, (ROWS, COLUMNS), generator=generator),
        student_hidden=student_hidden.requires_grad_(),
        student_head=OutputHead(student_head),
        teacher=LocalTeacher(teacher_logits, OutputHead(torch.eye(VOCAB, dtype=torch.float64))),
    )


def hidden_gradient(args: OPDConfig, seed: int) -> torch.Tensor:
    batch = random_batch(seed)
    output = OPDObjective.from_config(args)(batch, StepNormalisers())
    (gradient,) = torch.autograd.grad(output.loss, batch.student_hidden, allow_unused=True)
    return torch.zeros_like(batch.student_hidden) if gradient is None else gradient


@pytest.mark.parametrize(("divergence", "parameters"), DIVERGENCES,
                         ids=[f"{name}-{'-'.join(f'{k}{v}' for k, v in p.items())}" for name, p in DIVERGENCES])
def test_no_accepted_config_has_an_identically_zero_gradient(divergence, parameters):
    tried, dead = 0, []
    for estimator, shape in itertools.product(ESTIMATORS, SHAPES):
        settings = {"divergence": divergence, **parameters, "estimator": estimator, **shape}
        args = accepted(**settings)
        if args is None:
            continue
        tried += 1
        zero_seeds = [seed for seed in SEEDS if not hidden_gradient(args, seed).abs().max() > 0]
        if zero_seeds:
            dead.append((settings, zero_seeds))
    assert tried > 0 or accepted(divergence=divergence, **parameters) is None  # skewed KLs with α = 1: refused
    assert not dead, f"{len(dead)} accepted configs train nothing, e.g. {dead[:3]}"


def test_the_grid_reaches_every_estimator_and_support():
    """The grid is not vacuous: each estimator and each support setting but a renormalised top-1 is accepted."""
    assert all(accepted(estimator=estimator) is not None for estimator in ESTIMATORS)
    for support in SUPPORTS:
        refused = support.get("loss_top_k") == 1 and not support["loss_top_k_tail"]
        assert (accepted(**support) is None) == refused, support


@pytest.mark.parametrize("source", ["student", "teacher", "union"])
def test_a_renormalised_top1_support_is_refused_and_names_the_sampled_token_estimator(source):
    with pytest.raises(ValueError, match=r"(?s)loss_top_k=1.*exactly 0.*estimator='sampled_pg'"):
        OPDConfig(output_dir="unused", use_cpu=True, report_to="none", loss_top_k=1, loss_top_k_source=source)
    # The sampled-token reverse KL (the papers' "OPD top-1") and a top-1 support with a tail are accepted.
    assert accepted(estimator="sampled_pg") is not None
    assert accepted(loss_top_k=1, loss_top_k_source=source, loss_top_k_tail=True) is not None


@pytest.mark.parametrize("source", ["student", "teacher", "union"])
def test_what_a_renormalised_top1_support_computes(source):
    """The reason for the refusal. On one token both distributions are 1: ℓ = 0 and no gradient. The union is
    {argmax p_S, argmax p_T}: the same wherever the argmaxes agree, a two-token divergence where they differ."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(64, VOCAB, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(64, VOCAB, generator=generator, dtype=torch.float64)
    teacher[:32] = student[:32].detach() + 0.1 * teacher[:32]  # the same argmax on (most of) the first half
    per_token = per_token_divergence(student, teacher, top_k=1, top_k_source=source)
    (gradient,) = torch.autograd.grad(per_token.sum(), student)
    dead = torch.ones(64, dtype=torch.bool)
    if source == "union":
        dead = student.argmax(-1) == teacher.argmax(-1)
        assert 0 < dead.sum() < len(dead)
        assert (per_token[~dead] > 0).all() and (gradient[~dead].abs().amax(-1) > 0).all()
    assert (per_token[dead] == 0).all() and not gradient[dead].any()


@pytest.mark.parametrize("divergence", ["skew_forward_kl", "skew_reverse_kl"])
def test_a_skewed_kl_with_alpha_one_is_refused(divergence):
    with pytest.raises(ValueError, match=r"alpha=1.*itself"):
        OPDConfig(output_dir="unused", use_cpu=True, report_to="none", divergence=divergence, alpha=1.0)
    assert accepted(divergence="reverse_kl", alpha=1.0) is not None  # ignored there
