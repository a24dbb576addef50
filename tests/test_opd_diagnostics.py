"""OPDTrainer's dynamics-diagnostics logging (`diagnostics_steps`, methods.md §7.1) against `overlap_stats` and
`tip_quadrants` computed on brute-force logits of the same batch (each row forwarded alone, no padding)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from test_opd_trainer import student, teacher, tokenizer  # noqa: F401  (module fixtures: tiny tokenizer and models)
from tiny import launch_two_cpu_processes
from test_tip import batch_and_loss, completion_logits, make_trainer, reference_rows
from trl_opd import OPDConfig
from trl_opd.diagnostics import OVERLAP_KEYS, OverlapAccumulator, overlap_stats, plot_diagnostics
from trl_opd import objective as objective_module
from trl_opd.weighting import tip_quadrants

K = 4


def reference_diagnostics(trainer, batch, k=K):
    """overlap_stats over every completion token of the batch, and TIP's shares from float64 brute force."""
    rows = range(batch["completion_ids"].shape[0])
    student_logits = torch.cat([completion_logits(trainer.model, batch, row)[0] for row in rows])
    teacher_logits = torch.cat([completion_logits(trainer.teacher_model, batch, row)[0] for row in rows])
    stats = overlap_stats(student_logits[None], teacher_logits[None], torch.ones(1, len(student_logits)), k=k)
    scores = reference_rows(trainer, batch)
    entropy = torch.tensor(np.concatenate([row["entropy"] for row in scores]))[None]
    divergence = torch.tensor(np.concatenate([row["reverse_kl"] for row in scores]))[None]
    shares = tip_quadrants(entropy, divergence, torch.ones_like(entropy, dtype=torch.bool))
    return stats, shares


def logged(trainer, mode="eval"):
    return {key.removeprefix("diagnostics/"): values for key, values in trainer._metrics[mode].items()
            if key.startswith("diagnostics/")}


def test_logged_diagnostics_equal_overlap_stats_of_the_batch(student, teacher, tokenizer, tmp_path):
    trainer = make_trainer(student, teacher, tokenizer, tmp_path, diagnostics_steps=1, diagnostics_top_k=K,
                           loss_chunk_size=5)  # several chunks per micro-batch
    batch, loss = batch_and_loss(trainer)
    stats, shares = reference_diagnostics(trainer, batch)
    values = logged(trainer)
    assert stats["num_tokens"] == batch["completion_mask"][:4].sum().item() > 10
    for key in OVERLAP_KEYS:
        assert values[key] == [pytest.approx(stats[key], rel=1e-4, abs=1e-5)], key
    quadrants = trainer._metrics["eval"]  # logged once, under TIP's names, by the diagnostics pass when TIP is off
    for quadrant, share in shares.items():
        assert quadrants[f"tip/{quadrant}_share"] == [pytest.approx(share)], quadrant
    assert sum(quadrants[f"tip/q{q}_share"][0] for q in range(1, 5)) == pytest.approx(1.0)
    assert not any(key.startswith("loss_support") for key in values)
    # Diagnostics never change the loss.
    plain = make_trainer(student, teacher, tokenizer, tmp_path / "plain", loss_chunk_size=5)
    assert batch_and_loss(plain)[1] == pytest.approx(loss, rel=1e-6)


def test_with_tip_the_shares_are_tips_own_and_top_k_support_masses_are_logged(student, teacher, tokenizer,
                                                                               tmp_path):
    trainer = make_trainer(student, teacher, tokenizer, tmp_path, diagnostics_steps=3, diagnostics_top_k=K,
                           token_selection="tip_soft_or", loss_top_k=5)
    batch_and_loss(trainer)
    values = logged(trainer)
    assert not any(key.startswith("tip_") for key in values)  # TIP's own pass logs the shares, once
    assert all(len(trainer._metrics["eval"][f"tip/q{q}_share"]) == 1 for q in range(1, 5))
    for side in ("student", "teacher"):
        (mass,) = values[f"loss_support_{side}_mass"]
        assert 0.0 < mass <= 1.0 + 1e-6
    stats, _ = reference_diagnostics(trainer, batch_and_loss(trainer)[0])
    assert values["overlap_ratio"][-1] == pytest.approx(stats["overlap_ratio"], rel=1e-4)


def test_diagnostics_every_n_steps_in_a_training_run_and_their_plots(student, teacher, tokenizer, tmp_path):
    trainer = make_trainer(student, teacher, tokenizer, tmp_path, diagnostics_steps=2, max_steps=4)
    trainer.train()
    entries = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in entries] == [1, 2, 3, 4]
    # Logged at the end of step s are the micro-batches of global_step s - 1: steps 0 and 2 are due.
    with_diagnostics = [entry["step"] for entry in entries if "diagnostics/overlap_ratio" in entry]
    assert with_diagnostics == [1, 3]
    for entry in entries[::2]:
        assert 0.0 <= entry["diagnostics/overlap_ratio"] <= 1.0
        assert 0.0 < entry["diagnostics/student_overlap_mass"] <= 1.0 + 1e-6
        assert entry["diagnostics/entropy_gap"] >= 0.0
    paths = plot_diagnostics(trainer.state.log_history, tmp_path / "plots")
    names = sorted(path.rsplit("/", 1)[-1] for path in paths)
    assert names == sorted([f"diagnostics_{key}.png" for key in OVERLAP_KEYS]
                           + [f"tip_q{q}_share.png" for q in range(1, 5)])
    for path in paths:
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_off_by_default_no_keys_and_no_work(student, teacher, tokenizer, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("diagnostics computed while off")

    monkeypatch.setattr(objective_module, "OverlapAccumulator", forbidden)
    monkeypatch.setattr(objective_module, "top_k_mass", forbidden)
    trainer = make_trainer(student, teacher, tokenizer, tmp_path, max_steps=1)
    assert trainer.args.diagnostics_steps == 0
    trainer.train()
    batch_and_loss(trainer)
    keys = {key for entry in trainer.state.log_history for key in entry} | set(trainer._metrics["eval"])
    assert not any(key.startswith("diagnostics/") for key in keys)


def test_sums_and_counts_summed_over_processes_give_the_union_statistics():
    """What `_log_loss_stats` does with the stashed pairs: Σ sums / Σ counts over processes."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 7, 12, generator=generator, dtype=torch.float64)
    teacher = student + torch.randn(2, 7, 12, generator=generator, dtype=torch.float64)
    mask = torch.ones(2, 7)
    mask[1, 4:] = 0
    student[0, 2, :3] += 30.0  # an empty intersection on "process 0": overlap_advantage counts differ per process
    teacher[0, 2, -3:] += 30.0
    ranks = [OverlapAccumulator(k=3), OverlapAccumulator(k=3), OverlapAccumulator(k=3)]
    ranks[0].update(student[0], teacher[0], mask[0])
    ranks[1].update(student[1], teacher[1], mask[1])  # ranks[2] saw no token: zeros, still sends its pairs
    pairs = [rank.sums_and_counts() for rank in ranks]
    whole = overlap_stats(student, teacher, mask, k=3)
    for key in OVERLAP_KEYS:
        total = sum(pair[key][0] for pair in pairs)
        count = sum(pair[key][1] for pair in pairs)
        assert (total / count).item() == pytest.approx(whole[key], rel=1e-12), key


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"diagnostics_steps": -1}, "diagnostics_steps"),
        ({"diagnostics_steps": 1.5}, "diagnostics_steps"),
        ({"diagnostics_top_k": 0}, "diagnostics_top_k"),
    ],
)
def test_config_rejects_bad_diagnostics_settings(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        OPDConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **overrides)


def test_top_k_larger_than_the_vocabulary_is_refused(student, teacher, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="diagnostics_top_k.*exceeds the vocabulary"):
        make_trainer(student, teacher, tokenizer, tmp_path, diagnostics_steps=1, diagnostics_top_k=100_000)


@pytest.mark.multiprocess
def test_two_processes_log_the_statistics_of_the_union_of_their_tokens(tmp_path):
    """Each rank scores 4 ragged rows; the logged values are Σ sums / Σ counts over both ranks, i.e. overlap_stats
    of all 8 rows, not a mean of the two per-rank values."""
    script = Path(__file__).resolve().parent / "ddp_diagnostics_run.py"
    launch_two_cpu_processes(script, tmp_path / "result.json")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["num_processes"] == 2
    rank0, rank1 = result["ranks"]
    assert rank0["local_tokens"] != rank1["local_tokens"]  # unequal counts: a mean of means would differ
    assert rank0["logged"] == rank1["logged"]
    for key in OVERLAP_KEYS:
        assert rank0["logged"][key] == [pytest.approx(result["union"][key], rel=1e-4, abs=1e-5)], key
