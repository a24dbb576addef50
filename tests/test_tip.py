"""Token selection and weighting inside OPDTrainer: TIP, PW-OPSD position weights, EDGE-OPD evidence mask.

Each loss is recomputed here by brute force: every row forwarded on its own (no padding), full logits, the
selection and weights written out with numpy in float64, then compared with what the trainer computes.
"""

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from test_opd_trainer import student, teacher, tokenizer  # noqa: F401  (module fixtures: tiny tokenizer and models)
from tiny import cpu_args, launch_two_cpu_processes, prompt_dataset
from trl_opd import OPDConfig, OPDTrainer
from trl_opd import objective as objective_module

RATIO = 0.5


def ragged_dataset():
    """Prompts and completions of different lengths (1- and 2-digit numbers), so padding sits on both sides."""
    return prompt_dataset(40).select([0, 13, 2, 38, 5, 21, 9, 30])


def make_trainer(student, teacher, tokenizer, tmp_path, **overrides):
    # lmbda=0: the completions are the dataset's (ragged lengths, no sampling), so a batch is reproducible.
    settings = dict(lmbda=0.0, max_completion_length=24, shuffle_dataset=False, **overrides)
    args = OPDConfig(output_dir=str(tmp_path / "out"), **cpu_args(**settings))
    return OPDTrainer(copy.deepcopy(student), copy.deepcopy(teacher), args=args, train_dataset=ragged_dataset(),
                      processing_class=tokenizer)


def batch_and_loss(trainer, rows=4):
    """One batch of dataset completions and the trainer's loss on it (eval mode: micro-batch normalisers)."""
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(rows)])
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return batch, loss.item()


def completion_logits(model, batch, row):
    """Logits predicting row `row`'s completion tokens, from an unpadded forward of that row alone, [L, V]."""
    prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()]
    completion = batch["completion_ids"][row][batch["completion_mask"][row].bool()]
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt, completion]).unsqueeze(0)).logits[0]
    return logits[len(prompt) - 1: len(prompt) - 1 + len(completion)].double(), completion


def reference_rows(trainer, batch):
    """Per row: reverse KL, forward KL, student entropy and log-probs of the sampled tokens (T = 1), float64."""
    rows = []
    for row in range(batch["completion_ids"].shape[0]):
        student_logits, tokens = completion_logits(trainer.model, batch, row)
        teacher_logits, _ = completion_logits(trainer.teacher_model, batch, row)
        log_s, log_t = student_logits.log_softmax(-1).numpy(), teacher_logits.log_softmax(-1).numpy()
        p_s, p_t = np.exp(log_s), np.exp(log_t)
        rows.append({
            "reverse_kl": (p_s * (log_s - log_t)).sum(-1),
            "forward_kl": (p_t * (log_t - log_s)).sum(-1),
            "entropy": -(p_s * log_s).sum(-1),
            "evidence": np.array([log_t[i, tok] - log_s[i, tok] for i, tok in enumerate(tokens.tolist())]),
        })
    return rows


def minmax(values):
    return (values - values.min()) / max(values.max() - values.min(), 1e-8)


def reference_tip_selection(rows, strategy, ratio=RATIO):
    """TIP by the paper: statistics over all tokens of the batch, top max(1, floor(rho * L)) per sequence."""
    entropy = np.concatenate([r["entropy"] for r in rows])
    entropy_hat = minmax(np.minimum(entropy, np.quantile(entropy, 0.98)))
    if strategy == "soft_or":
        divergence_hat = minmax(np.concatenate([r["reverse_kl"] for r in rows]))
        scores = entropy_hat + divergence_hat - entropy_hat * divergence_hat
    elif strategy == "q3":
        scores = np.concatenate([r["forward_kl"] for r in rows]) * (1 - entropy_hat)
    else:
        scores = np.concatenate([r["reverse_kl"] for r in rows])
    selections, start = [], 0
    for r in rows:
        length = len(r["entropy"])
        row_scores = scores[start: start + length]
        keep = max(1, math.floor(ratio * length))
        chosen = np.zeros(length, dtype=bool)
        chosen[np.argsort(-row_scores, kind="stable")[:keep]] = True
        selections.append(chosen)
        start += length
    return selections


def reference_position_weights(length, w_min=0.25, tau=0.30, slope=0.10, decreasing=False):
    weights = []
    for index in range(1, length + 1):
        u = (index - 0.5) / length
        u = 1 - u if decreasing else u
        weights.append(w_min + (1 - w_min) / (1 + math.exp(-(u - tau) / slope)))
    return np.array(weights)


def token_weights(trainer, batch, student_hidden, teacher_hidden):
    """The weights the trainer's objective gives these hidden states (no gradient), with the trainer's seed."""
    completion = trainer._completion_batch(trainer.model, batch, student_hidden, teacher_hidden)
    return trainer.objective.token_weights(completion, selection_seed=trainer._selection_seed())


def weighted_mean(rows, weights):
    """Σ w·ℓ / Σ w over all tokens of the batch (the `weighted_mean` reduction, reverse KL)."""
    numerator = sum((w * r["reverse_kl"]).sum() for r, w in zip(rows, weights))
    return numerator / sum(w.sum() for w in weights)


# ---------------------------------------------------------------- TIP


@pytest.mark.parametrize("strategy", ["soft_or", "divergence_only", "q3"])
def test_tip_loss_is_the_mean_over_the_brute_force_selection(student, teacher, tokenizer, tmp_path, strategy,
                                                             monkeypatch):
    trainer = make_trainer(student, teacher, tokenizer, tmp_path, token_selection=f"tip_{strategy}",
                           token_ratio=RATIO, loss_reduction="weighted_mean")
    rows_in_gradient_pass = []
    original = objective_module.fused_divergence_loss

    def spy(student_hidden, *args, **kwargs):
        rows_in_gradient_pass.append(student_hidden.shape[0])
        return original(student_hidden, *args, **kwargs)

    monkeypatch.setattr(objective_module, "fused_divergence_loss", spy)
    batch, loss = batch_and_loss(trainer)
    rows = reference_rows(trainer, batch)
    selection = reference_tip_selection(rows, strategy)
    assert loss == pytest.approx(weighted_mean(rows, [s.astype(float) for s in selection]), rel=1e-4)
    lengths = batch["completion_mask"].sum(1).tolist()
    assert len(set(lengths)) > 1  # ragged completions, right-padded
    # Only the selected tokens reach the LM head with gradients: that is where TIP's memory saving comes from.
    assert rows_in_gradient_pass == [sum(max(1, math.floor(RATIO * n)) for n in lengths)]


def test_entropy_sampling_is_seeded_from_seed_and_step(student, teacher, tokenizer, tmp_path):
    trainer = make_trainer(student, teacher, tokenizer, tmp_path, token_selection="tip_entropy_sample",
                           token_ratio=0.4)
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(4)])
    mask = batch["completion_mask"]
    hidden = torch.randn(*mask.shape, 32)

    def selection(step):
        trainer.state.global_step = step
        return token_weights(trainer, batch, hidden, torch.randn(*mask.shape, 48))

    first, again, later = selection(3), selection(3), selection(4)
    torch.testing.assert_close(first, again)  # a function of (seed, step): every process draws the same tokens
    assert not torch.equal(first, later)
    kept = first.sum(1).tolist()
    assert kept == [max(1, math.floor(0.4 * n)) for n in mask.sum(1).tolist()]
    assert bool((first[~mask.bool()] == 0).all())


def test_importance_weighted_entropy_sampling_uses_inverse_inclusion_weights(student, teacher, tokenizer, tmp_path):
    trainer = make_trainer(student, teacher, tokenizer, tmp_path, token_selection="tip_entropy_sample",
                           token_importance_weighting=True, token_ratio=0.5)
    trainer.model.eval()
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(4)])
    hidden = trainer._hidden_states(trainer.model, *trainer._student_sequence(batch), batch["completion_ids"].shape[1])
    teacher_hidden = trainer._teacher_hidden_state(batch, batch["completion_ids"].shape[1])
    weights = token_weights(trainer, batch, hidden, teacher_hidden)
    rows = reference_rows(trainer, batch)
    for row, reference in enumerate(rows):
        entropy = np.maximum(reference["entropy"], 1e-8)
        keep = max(1, math.floor(0.5 * len(entropy)))
        inclusion = np.minimum(1.0, keep * entropy / entropy.sum())
        row_weights = weights[row][batch["completion_mask"][row].bool()].double().numpy()
        chosen = row_weights > 0
        np.testing.assert_allclose(row_weights[chosen], 1 / inclusion[chosen], rtol=1e-3)


def test_tip_run_logs_ratio_and_quadrant_shares(student, teacher, tokenizer, tmp_path):
    trainer = make_trainer(student, teacher, tokenizer, tmp_path, token_selection="tip_soft_or", token_ratio=0.5,
                           loss_reduction="weighted_mean", max_steps=2)
    trainer.train()
    log = trainer.state.log_history[0]
    assert 0.35 <= log["opd/selected_share"] <= 0.6  # ⌊L/2⌋ of each ragged row (at least one)
    shares = [log[f"tip/q{k}_share"] for k in range(1, 5)]
    assert sum(shares) == pytest.approx(1.0, abs=1e-6)
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


@pytest.mark.multiprocess
def test_weighted_mean_normalises_by_the_tokens_selected_on_all_processes(tmp_path):
    """Two processes select different numbers of tokens; each divides by (Σ over both) / 2, so that DDP's gradient
    average is the mean over every selected token, not the mean of the two per-process means."""
    script = Path(__file__).resolve().parent / "ddp_tip_run.py"
    launch_two_cpu_processes(script, tmp_path / "result.json")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["num_processes"] == 2
    rank0, rank1 = result["records"]
    for (sum0, selected0), (sum1, selected1) in zip(rank0, rank1):
        assert sum0 + sum1 == pytest.approx(2.0, abs=1e-5)  # Σ c over both processes = 2: the DDP mean is 1
        assert sum0 == pytest.approx(2 * selected0 / (selected0 + selected1), rel=1e-5)
    assert any(s0 != s1 for (_, s0), (_, s1) in zip(rank0, rank1))  # the two normalisations did differ
    assert all(math.isfinite(loss) for loss in result["losses"]) and len(result["losses"]) == 2


# ---------------------------------------------------------------- PW-OPSD and composition


@pytest.mark.parametrize("direction", ["increasing", "decreasing"])
def test_position_weights_with_sequence_mean(student, teacher, tokenizer, tmp_path, direction):
    """PW-OPSD: (1/|B|) Σ_b (1/L_b) Σ_t w_t ℓ_t, normalised by L_b and not by Σ w."""
    trainer = make_trainer(student, teacher, tokenizer, tmp_path, position_weighting=direction,
                           loss_reduction="sequence_mean")
    batch, loss = batch_and_loss(trainer)
    rows = reference_rows(trainer, batch)
    per_sequence = [
        (reference_position_weights(len(r["reverse_kl"]), decreasing=direction == "decreasing") * r["reverse_kl"]).sum()
        / len(r["reverse_kl"])
        for r in rows
    ]
    assert loss == pytest.approx(float(np.mean(per_sequence)), rel=1e-4)


def test_tip_and_position_weights_compose(student, teacher, tokenizer, tmp_path):
    """TIP keeps its tokens, PW weights them by their position in the whole completion: Σ_T w ℓ / Σ_T w."""
    trainer = make_trainer(student, teacher, tokenizer, tmp_path, token_selection="tip_soft_or", token_ratio=RATIO,
                           position_weighting="increasing", position_w_min=0.1, loss_reduction="weighted_mean")
    batch, loss = batch_and_loss(trainer)
    rows = reference_rows(trainer, batch)
    selection = reference_tip_selection(rows, "soft_or")
    weights = [s * reference_position_weights(len(s), w_min=0.1) for s in selection]
    assert loss == pytest.approx(weighted_mean(rows, weights), rel=1e-4)


# ---------------------------------------------------------------- EDGE-OPD evidence mask


@pytest.mark.parametrize(("mode", "extra"), [("threshold", {"evidence_threshold": 0.0}),
                                             ("threshold", {"evidence_threshold": 0.02}),
                                             ("quantile", {"evidence_quantile": 0.3})])
def test_evidence_mask_keeps_tokens_the_teacher_supports(student, teacher, tokenizer, tmp_path, mode, extra):
    trainer = make_trainer(student, teacher, tokenizer, tmp_path, evidence_mode=mode, loss_reduction="weighted_mean",
                           **extra)
    batch, loss = batch_and_loss(trainer)
    rows = reference_rows(trainer, batch)
    if mode == "threshold":
        kept = [r["evidence"] > extra["evidence_threshold"] for r in rows]
    else:
        cutoff = np.quantile(np.concatenate([r["evidence"] for r in rows]), 1 - extra["evidence_quantile"])
        kept = [r["evidence"] >= cutoff for r in rows]
    assert 0 < sum(k.sum() for k in kept) < sum(len(k) for k in kept)  # the mask really removes some tokens
    assert loss == pytest.approx(weighted_mean(rows, [k.astype(float) for k in kept]), rel=1e-4)


# ---------------------------------------------------------------- bad configurations


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"token_selection": "tip_soft_or", "token_ratio": 0.0}, "`token_ratio` must be in (0, 1]"),
        ({"token_selection": "tip_soft_or", "token_ratio": 1.5}, "`token_ratio` must be in (0, 1]"),
        ({"token_selection": "tip_random"}, "Unknown `token_selection`='tip_random'"),
        ({"token_selection_scope": "row"}, "Unknown `token_selection_scope`"),
        ({"token_importance_weighting": True}, "set token_selection='tip_entropy_sample'"),
        ({"token_scoring_chunk_size": 0}, "`token_scoring_chunk_size` must be >= 1"),
        ({"position_weighting": "linear"}, "Unknown `position_weighting`"),
        ({"position_slope": 0.0}, "`position_slope` must be > 0"),
        ({"position_w_min": 1.5}, "`position_w_min` must be in [0, 1]"),
        ({"evidence_mode": "margin"}, "Unknown `evidence_mode`"),
        ({"evidence_mode": "quantile", "evidence_quantile": 0.0}, "`evidence_quantile` must be in (0, 1]"),
        ({"evidence_threshold": float("nan")}, "`evidence_threshold` must be a finite"),
    ],
)
def test_config_rejects_bad_selection_and_weighting(tmp_path, overrides, message):
    with pytest.raises(ValueError) as error:
        OPDConfig(output_dir=str(tmp_path), **cpu_args(**overrides))
    assert message in str(error.value)


def test_scoring_chunk_defaults_to_the_selected_share_of_the_loss_chunk(tmp_path):
    """⌈ρ·c⌉ with c the loss's chunk for all the tokens: loss_chunk_size, or TRL's vocabulary tile when smaller."""

    def scoring_chunk(vocab, tokens, **overrides):
        args = OPDConfig(output_dir=str(tmp_path), **cpu_args(token_selection="tip_soft_or", token_ratio=0.3,
                                                              loss_chunk_size=1000, **overrides))
        return objective_module.OPDObjective.from_config(args).chunks.scoring_tokens(tokens, vocab)

    assert scoring_chunk(vocab=1000, tokens=5000) == 300  # small vocabulary: the chunk is loss_chunk_size
    assert scoring_chunk(vocab=151_936, tokens=4096) == math.ceil(0.3 * (4096 * 32768 // 151_936))
    assert scoring_chunk(vocab=151_936, tokens=4096, token_scoring_chunk_size=77) == 77