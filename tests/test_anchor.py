"""AAPA anchor discriminator and reward (methods.md §11.2), its schedule, baseline and policy term (§11.3)."""

from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
import torch

from trl_opd.anchor import (
    AnchorDiscriminator,
    AnchorSchedule,
    anchor_policy_loss,
    anchor_reward,
    completion_text,
    leave_one_out_advantages,
    make_anchor_reward,
)

SMALL = {"num_buckets": 4096, "ngram_range": (2, 3)}


def expert_solution(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
    return (
        f"First, add {a} and {b}: {a} + {b} = {a + b}. Next, multiply by {c}: {a + b} \\times {c} = "
        f"{(a + b) * c}. Therefore the answer is \\boxed{{{(a + b) * c}}}."
    )


def student_rambling(rng: random.Random) -> str:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    filler = " ".join(
        rng.choice(["hmm", "wait", "maybe", "ok", "so", "um"]) for _ in range(rng.randint(4, 12))
    )
    return f"{filler} {a} {b} {filler} i think its {a * b + rng.randint(1, 5)}"


def corpus(n: int, seed: int):
    rng = random.Random(seed)
    return [expert_solution(rng) for _ in range(n)], [student_rambling(rng) for _ in range(n)]


@pytest.fixture(scope="module")
def trained():
    experts, students = corpus(40, seed=0)
    discriminator = AnchorDiscriminator(**SMALL)
    metrics = discriminator.fit(experts, students, steps=40, validation_fraction=0.25, seed=0)
    return discriminator, metrics


def reference_buckets(text: str, n: int, num_buckets: int) -> list[int]:
    """The documented hash in plain Python integers.

    h = n; h ← h·P + ord(c) (mod 2^64) over the window; SplitMix64; modulo the number of buckets.
    """
    mask, prime = (1 << 64) - 1, 0x100000001B3
    buckets = []
    for start in range(len(text) - n + 1):
        h = n
        for char in text[start : start + n]:
            h = (h * prime + ord(char)) & mask
        h ^= h >> 30
        h = (h * 0xBF58476D1CE4E5B9) & mask
        h ^= h >> 27
        h = (h * 0x94D049BB133111EB) & mask
        h ^= h >> 31
        buckets.append(h % num_buckets)
    return buckets


def test_features_match_the_documented_hash_and_weighting():
    text = "Ünïcode 2+2=4, \\boxed{4} ✓"
    discriminator = AnchorDiscriminator(num_buckets=97, ngram_range=(1, 3))
    ids, values = discriminator._text_features(text)
    counts = {}
    for n in (1, 2, 3):
        for bucket in reference_buckets(text, n, 97):
            counts[bucket] = counts.get(bucket, 0) + 1
    expected_ids = sorted(counts)
    expected = np.array([math.log1p(counts[i]) for i in expected_ids])
    assert ids.tolist() == expected_ids
    np.testing.assert_allclose(values, expected / np.sqrt((expected**2).sum()))
    assert discriminator._text_features("")[0].size == 0


def test_logits_are_the_linear_model_on_dense_features(trained):
    discriminator, _ = trained
    texts = ["a short text", "First, add 3 and 4: 3 + 4 = 7."]
    for text, logit in zip(texts, discriminator.logits(texts).tolist()):
        ids, values = discriminator._text_features(text)
        dense = np.zeros(discriminator.num_buckets)
        np.add.at(dense, ids, values)
        assert logit == pytest.approx(
            float(dense @ discriminator.weight.double().numpy() + discriminator.bias), abs=1e-5
        )


def test_separates_two_clearly_different_distributions(trained):
    discriminator, metrics = trained
    assert metrics["train_accuracy"] == 1.0 and metrics["validation_accuracy"] == 1.0
    fresh_experts, fresh_students = corpus(20, seed=123)
    expert_scores, student_scores = discriminator.score(fresh_experts), discriminator.score(fresh_students)
    assert min(expert_scores) > 0 > max(student_scores)
    assert all(-5.0 <= s <= 5.0 for s in expert_scores + student_scores)
    probabilities = discriminator.probability(fresh_experts[:3])
    assert all(0.5 < p < 1.0 for p in probabilities)


def test_fit_is_deterministic_given_the_seed():
    experts, students = corpus(12, seed=1)
    runs = []
    for seed in (7, 7, 8):
        discriminator = AnchorDiscriminator(**SMALL)
        discriminator.fit(experts, students, steps=20, validation_fraction=0.25, seed=seed)
        runs.append(discriminator)
    assert torch.equal(runs[0].weight, runs[1].weight) and torch.equal(runs[0].bias, runs[1].bias)
    assert not torch.equal(runs[0].weight, runs[2].weight)  # the seed picks the held-out split


def dense_features(discriminator, texts):
    rows = np.zeros((len(texts), discriminator.num_buckets))
    for row, text in zip(rows, texts):
        ids, values = discriminator._text_features(text)
        np.add.at(row, ids, values)
    return rows


def test_fit_reaches_the_minimum_of_the_documented_objective():
    experts, students = corpus(8, seed=3)
    discriminator = AnchorDiscriminator(**SMALL)
    discriminator.fit(experts, students + students[:4], steps=200, weight_decay=1e-2, validation_fraction=0.0)
    features = dense_features(discriminator, experts + students + students[:4])
    labels = np.array([1.0] * 8 + [0.0] * 12)
    class_weights = np.where(labels > 0, 0.5 / 8, 0.5 / 12)
    weight, bias = discriminator.weight.double().numpy(), float(discriminator.bias)
    residual = class_weights * (1 / (1 + np.exp(-(features @ weight + bias))) - labels)
    gradient_w = features.T @ residual + 2 * 1e-2 * weight  # ∇ of the balanced logistic loss + λ‖w‖²
    assert np.abs(gradient_w).max() < 1e-5 and abs(residual.sum()) < 1e-5
    assert np.abs(weight).max() > 0.1  # and it did learn something


def test_class_balance_makes_duplicates_irrelevant():
    experts, students = corpus(10, seed=2)
    balanced, duplicated = AnchorDiscriminator(**SMALL), AnchorDiscriminator(**SMALL)
    balanced.fit(experts, students, validation_fraction=0.0)
    duplicated.fit(experts * 3, students, validation_fraction=0.0)  # each expert three times: same objective
    probe = corpus(5, seed=11)[0] + corpus(5, seed=11)[1]
    torch.testing.assert_close(balanced.logits(probe), duplicated.logits(probe), rtol=0, atol=1e-3)
    assert "validation_accuracy" not in balanced.metrics


def test_scores_are_clipped_logits():
    discriminator = AnchorDiscriminator(num_buckets=64, score_clip=2.0)
    discriminator.weight, discriminator.bias, discriminator.fitted = (
        torch.full((64,), 10.0),
        torch.tensor(-1.0),
        True,
    )
    logits = discriminator.logits(["abc", ""]).tolist()
    assert logits[0] > 2.0 and logits[1] == -1.0
    assert discriminator.score(["abc", ""]) == [2.0, -1.0]


def test_save_load_round_trip(tmp_path, trained):
    discriminator, metrics = trained
    path = tmp_path / "anchor.pt"
    discriminator.save(path)
    restored = AnchorDiscriminator.load(path)
    texts = corpus(3, seed=5)[0] + corpus(3, seed=5)[1]
    assert restored.score(texts) == discriminator.score(texts)
    assert restored.metrics == metrics and restored.ngram_range == discriminator.ngram_range
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an AnchorDiscriminator file"):
        AnchorDiscriminator.load(tmp_path / "other.pt")


def test_anchor_reward_has_the_trl_signature(tmp_path, trained):
    discriminator, _ = trained
    discriminator.save(tmp_path / "anchor.pt")
    reward = make_anchor_reward(tmp_path / "anchor.pt")
    assert reward.func.__name__ == "anchor_reward"  # TRL names a functools.partial reward after its function
    experts, students = corpus(2, seed=9)
    plain = reward(
        prompts=["p"] * 4, completions=experts + students, completion_ids=[[1]] * 4, trainer_state=None
    )
    assert plain == discriminator.score(experts + students)
    conversational = [[{"role": "assistant", "content": text}] for text in experts + students]
    assert reward(prompts=[[{"role": "user", "content": "p"}]] * 4, completions=conversational) == plain
    assert anchor_reward(["p"], [students[0]], discriminator=discriminator) == plain[2:3]
    assert pickle.loads(pickle.dumps(reward))(prompts=["p"], completions=[experts[0]]) == plain[:1]


def test_completion_text_handles_content_blocks():
    blocks = [
        {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    assert completion_text(blocks) == "ab"
    assert completion_text("plain") == "plain"


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="not trained"):
        AnchorDiscriminator().score(["x"])
    with pytest.raises(ValueError, match="not trained"):
        make_anchor_reward(AnchorDiscriminator())
    with pytest.raises(ValueError, match="at least one expert"):
        AnchorDiscriminator().fit([], ["x"])
    with pytest.raises(ValueError, match="ngram_range"):
        AnchorDiscriminator(ngram_range=(3, 2))
    with pytest.raises(ValueError, match="num_buckets"):
        AnchorDiscriminator(num_buckets=0)
    with pytest.raises(ValueError, match="validation_fraction"):
        AnchorDiscriminator().fit(["a"], ["b"], validation_fraction=1.0)
    trained_one = AnchorDiscriminator(num_buckets=16)
    trained_one.fit(["a"], ["b"], steps=1, validation_fraction=0.0)
    with pytest.raises(ValueError, match="list of strings"):
        trained_one.score("a single string")


# ---------------------------------------------------------------- the staged weight, the baseline, the policy term


@pytest.mark.parametrize("start,ramp", [(0, 0), (3, 0), (2, 4), (0, 1)])
def test_schedule_matches_its_formula(start, ramp):
    schedule = AnchorSchedule(0.3, start, ramp)
    for step in range(12):
        if step < start:
            expected = 0.0
        elif ramp == 0:
            expected = 0.3
        else:
            expected = 0.3 * min(1.0, (step - start) / ramp)
        assert schedule.weight_at(step) == pytest.approx(expected)
    assert AnchorSchedule(0.3, 2, 4).weight_at(4) == pytest.approx(0.15)  # half-way up the ramp


@pytest.mark.parametrize(
    "kwargs,match",
    [({"weight": math.inf}, "aapa_weight"), ({"start_step": -1}, "aapa_start_step"),
     ({"ramp_steps": 1.5}, "aapa_ramp_steps"), ({"ramp_steps": True}, "aapa_ramp_steps")],
)
def test_schedule_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AnchorSchedule(**kwargs)


def test_leave_one_out_advantages_match_brute_force():
    scores = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])
    rows = torch.tensor([True, True, False, True, True])
    taken = [i for i in range(5) if rows[i]]
    expected = [
        scores[i].item() - sum(scores[j].item() for j in taken if j != i) / (len(taken) - 1) if rows[i] else 0.0
        for i in range(5)
    ]
    torch.testing.assert_close(leave_one_out_advantages(scores, rows), torch.tensor(expected))
    everyone = leave_one_out_advantages(scores)
    torch.testing.assert_close(everyone, scores - (scores.sum() - scores) / 4)
    assert leave_one_out_advantages(scores, torch.tensor([False, False, True, False, False])).eq(0).all()


def test_anchor_policy_loss_is_reinforce_with_zero_value():
    """Value 0; gradient −w Σ_{b,t} c_bt A_b ∇log π(ŷ_bt), against a float64 brute-force loop."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 7, (3, 4), generator=generator)
    coefficients = torch.rand(3, 4, generator=generator, dtype=torch.float64) * torch.tensor([[1, 1, 1, 0]] * 3)
    advantages = torch.tensor([0.7, -1.2, 0.0], dtype=torch.float64)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1))[..., 0]
    loss = anchor_policy_loss(logp, advantages, coefficients, weight=0.4)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, logits)
    surrogate = 0.0
    for b in range(3):
        for t in range(4):
            log_probs = torch.log_softmax(logits[b, t], -1)
            surrogate = surrogate - 0.4 * coefficients[b, t].item() * advantages[b].item() * log_probs[tokens[b, t]]
    (expected,) = torch.autograd.grad(surrogate, logits)
    torch.testing.assert_close(grad, expected)
    assert grad[2].eq(0).all() and grad[:, 3].eq(0).all()  # A = 0 and c = 0 contribute nothing
    with pytest.raises(ValueError, match="advantages"):
        anchor_policy_loss(logp, advantages[:2], coefficients, weight=0.4)
