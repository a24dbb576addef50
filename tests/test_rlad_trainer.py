"""RLADTrainer end to end on tiny models: exact GRPO at α = 1, the TRRD batch and loss against brute force, every
GRPO loss type, the AAPA anchor reward, errors before loading, and a 2-process CPU run of the recipe."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from trl import GRPOConfig, GRPOTrainer

from tiny import cpu_args, launch_two_cpu_processes, prompt_dataset, save_anchor, save_tiny, tiny_model, tiny_tokenizer
from trl_opd import RLADConfig, RLADTrainer

REPO = Path(__file__).resolve().parents[1]
OTHER_TEXTS = [f"word{i} other{i * 7} thing alpha beta gamma" for i in range(200)]  # merges unlike tiny.CORPUS


def char_variety_reward(prompts, completions, **kwargs):
    """A reward that differs between completions of random models, so advantages are not all zero."""
    return [float(len(set(text))) for text in completions]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def student(tokenizer):
    return tiny_model(tokenizer, hidden=32, seed=0)


@pytest.fixture(scope="module")
def teacher(tokenizer):
    """A confident teacher (scaled output layer), far from the near-uniform random student: the clamp matters."""
    model = tiny_model(tokenizer, hidden=48, seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    return model


def settings(**overrides):
    return cpu_args(**{"max_steps": 3, "num_generations": 4, "temperature": 0.7, **overrides})


def rlad(student, teacher, tokenizer, tmp_path, trainer_class=RLADTrainer, reward_funcs=char_variety_reward,
         **overrides):
    args = RLADConfig(output_dir=str(tmp_path / "rlad"), **settings(**overrides))
    return trainer_class(
        copy.deepcopy(student), reward_funcs, args=args, train_dataset=prompt_dataset(), processing_class=tokenizer,
        teacher_model=copy.deepcopy(teacher),
    )


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


# ---------------------------------------------------------------- α = 1 is GRPO, step by step


@pytest.mark.parametrize(
    "overrides, teacher_logs",
    [({}, None), ({}, True), ({"loss_type": "grpo", "gradient_accumulation_steps": 2}, True)],
)
def test_alpha_one_trains_exactly_like_grpo(student, teacher, tokenizer, tmp_path, overrides, teacher_logs):
    # Each trainer seeds the RNGs in its constructor: build and train one after the other.
    ours = rlad(student, teacher, tokenizer, tmp_path, rlad_alpha=1.0, rlad_log_teacher_stats=teacher_logs,
                **overrides)
    ours.train()
    reference = GRPOTrainer(
        copy.deepcopy(student), char_variety_reward, args=GRPOConfig(output_dir=str(tmp_path / "grpo"),
                                                                    **settings(**overrides)),
        train_dataset=prompt_dataset(), processing_class=tokenizer,
    )
    reference.train()
    assert logged(ours, "loss") == logged(reference, "loss")
    assert logged(ours, "grad_norm") == logged(reference, "grad_norm")
    assert any(norm > 0 for norm in logged(ours, "grad_norm"))  # the run really trained
    for mine, theirs in zip(ours.model.parameters(), reference.model.parameters()):
        assert torch.equal(mine, theirs)
    # At α = 1 the teacher is scored only when its statistics are asked for (then for the logs alone).
    assert len(logged(ours, "rlad/teacher_log_ratio")) == (3 if teacher_logs else 0)


# ---------------------------------------------------------------- the TRRD batch and loss, against brute force


class RecordingRLAD(RLADTrainer):
    """Keeps every micro-batch `_compute_loss` saw and the loss it returned."""

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        self.recorded = getattr(self, "recorded", [])
        self.recorded.append(({k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}, loss.detach()))
        return loss


@torch.no_grad()
def brute_force_logprobs(model, inputs, temperature):
    """log softmax(logits / T) of each completion token, from the full logits of an ordinary forward pass."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    length = inputs["completion_ids"].size(1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -length - 1 : -1].double()
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    return log_probs.gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)


def brute_force_grpo_loss(old, teacher, advantages, mask, alpha, clamp, eps_low, eps_high):
    """Eq. 3 and GRPO's 'grpo' aggregation, token by token, at the first step (log π_θ = log π_old in value)."""
    row_losses = []
    for row in range(mask.size(0)):
        total, count = 0.0, 0.0
        for t in range(mask.size(1)):
            if not mask[row, t]:
                continue
            gap = old[row, t].item() - teacher[row, t].item()
            ratio = math.exp((1 - alpha) * max(-clamp, min(clamp, gap)))
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            a = advantages[row].item()
            total += -min(ratio * a, clipped * a)
            count += 1
        row_losses.append(total / max(count, 1.0))
    return sum(row_losses) / len(row_losses)


def test_batch_carries_teacher_logprobs_and_the_trrd_anchor(student, teacher, tokenizer, tmp_path):
    alpha, clamp, temperature = 0.3, 0.5, 0.7
    trainer = rlad(student, teacher, tokenizer, tmp_path, trainer_class=RecordingRLAD, max_steps=1,
                   rlad_alpha=alpha, rlad_teacher_clamp=clamp, loss_type="grpo", epsilon=0.2, epsilon_high=0.28)
    trainer.train()
    (inputs, loss), = trainer.recorded
    mask = inputs["completion_mask"].bool()
    old = brute_force_logprobs(student, inputs, temperature)  # the student before its first update
    teacher_logps = brute_force_logprobs(teacher, inputs, temperature)

    torch.testing.assert_close(inputs["teacher_per_token_logps"].double()[mask], teacher_logps[mask],
                               rtol=0, atol=1e-5)
    gap = (old - teacher_logps).clamp(-clamp, clamp)
    anchor = alpha * old + (1 - alpha) * (old - gap)
    torch.testing.assert_close(inputs["old_per_token_logps"].double()[mask], anchor[mask], rtol=0, atol=1e-5)

    clamped = ((old - teacher_logps).abs() > clamp)[mask]
    assert 0 < clamped.float().mean() < 1  # both sides of the clamp are exercised
    expected = brute_force_grpo_loss(old, teacher_logps, inputs["advantages"], mask, alpha, clamp, 0.2, 0.28)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert abs(expected) > 1e-3  # the teacher moved the ratio away from 1: the first loss is not GRPO's 0

    first = trainer.state.log_history[0]
    assert first["rlad/teacher_log_ratio"] == pytest.approx((old - teacher_logps)[mask].mean().item(), abs=1e-5)
    assert first["rlad/teacher_clamp_share"] == pytest.approx(clamped.float().mean().item())
    assert first["clip_ratio/region_mean"] > 0  # GRPO's clip fractions now count TRRD ratios


class GradientRecordingRLAD(RecordingRLAD):
    """Also keeps the gradient of each micro-batch loss with respect to the student's parameters."""

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
        self.gradients = dict(zip(names, torch.autograd.grad(loss, params, retain_graph=True)))
        return loss


def brute_force_literal_loss(student, teacher, inputs, alpha, clamp, temperature, eps_low, eps_high):
    """App. B's TRRD loss with the literal clamp of the θ-dependent log-ratio, token by token in float64, on a float64
    copy of the student: log r = α (log π_θ − log π_old) + (1 − α)·(log π_θ − log π_T if |log π_θ − log π_T| ≤ c,
    else ±c, a constant), then GRPO's clipped surrogate and its 'grpo' aggregation. Returns (loss, float64 model)."""
    model = copy.deepcopy(student).double()
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    length = inputs["completion_ids"].size(1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -length - 1 : -1]
    logp = torch.log_softmax(logits / temperature, dim=-1).gather(-1, inputs["completion_ids"].unsqueeze(-1))[..., 0]
    teacher_logp = brute_force_logprobs(copy.deepcopy(teacher).double(), inputs, temperature)
    mask = inputs["completion_mask"]
    row_losses = []
    for row in range(mask.size(0)):
        terms = []
        for t in range(mask.size(1)):
            if not mask[row, t]:
                continue
            gap = logp[row, t] - teacher_logp[row, t]
            teacher_term = gap if abs(gap.item()) <= clamp else math.copysign(clamp, gap.item())
            log_ratio = alpha * (logp[row, t] - logp[row, t].detach()) + (1 - alpha) * teacher_term
            ratio, advantage = torch.exp(log_ratio), inputs["advantages"][row].item()
            terms.append(-torch.min(ratio * advantage, ratio.clamp(1 - eps_low, 1 + eps_high) * advantage))
        row_losses.append(torch.stack(terms).sum() / max(len(terms), 1))
    return torch.stack(row_losses).mean(), model


@pytest.mark.parametrize("mode", ["literal", "straight_through"])
def test_literal_clamp_trains_the_gradient_of_app_b(student, teacher, tokenizer, tmp_path, mode):
    """The trainer's gradient equals the brute-force float64 gradient of the literal clamp; the straight-through
    default has the same loss value but another gradient (∇ log π_θ on clamped tokens instead of α ∇ log π_θ)."""
    alpha, clamp, temperature = 0.3, 0.5, 0.7
    trainer = rlad(student, teacher, tokenizer, tmp_path, trainer_class=GradientRecordingRLAD, max_steps=1,
                   rlad_alpha=alpha, rlad_teacher_clamp=clamp, rlad_teacher_clamp_mode=mode, loss_type="grpo",
                   epsilon=0.2, epsilon_high=0.28)
    trainer.train()
    (inputs, loss), = trainer.recorded
    expected_loss, model = brute_force_literal_loss(student, teacher, inputs, alpha, clamp, temperature, 0.2, 0.28)
    assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-5)  # both modes: the same value
    names = list(trainer.gradients)
    expected = torch.autograd.grad(expected_loss, [dict(model.named_parameters())[name] for name in names])
    ours = torch.cat([trainer.gradients[name].double().flatten() for name in names])
    expected = torch.cat([grad.flatten() for grad in expected])
    assert expected.abs().max() > 1e-4
    distance = ((ours - expected).norm() / expected.norm()).item()
    if mode == "literal":
        assert distance < 1e-4, distance
        assert "rlad_logp_grad_scale" in inputs and (inputs["rlad_logp_grad_scale"] == alpha).any()
    else:
        assert distance > 1e-2, distance  # the clamped tokens' gradient differs
        assert "rlad_logp_grad_scale" not in inputs


def test_literal_clamp_refuses_losses_that_read_the_log_probs_directly():
    for overrides in ({"loss_type": "cispo"}, {"loss_type": "vespo"},
                      {"beta": 0.1, "use_bias_correction_kl": False}):
        with pytest.raises(ValueError, match="rlad_teacher_clamp_mode='literal'"):
            RLADConfig(output_dir="unused", rlad_teacher_clamp_mode="literal", **settings(**overrides))
    with pytest.raises(ValueError, match="Unknown `rlad_teacher_clamp_mode`"):
        RLADConfig(output_dir="unused", rlad_teacher_clamp_mode="hard", **settings())
    RLADConfig(output_dir="unused", rlad_teacher_clamp_mode="literal", loss_type="sapo", **settings())


def test_off_policy_mask_keeps_the_real_sampling_logprobs(student, teacher, tokenizer, tmp_path):
    """GRPO's off-policy mask reads `sampling_per_token_logps` (else `old_per_token_logps`): it must see π_old, not
    the anchor."""
    trainer = rlad(student, teacher, tokenizer, tmp_path, trainer_class=RecordingRLAD, max_steps=1,
                   off_policy_mask_threshold=0.5)
    trainer.train()
    (inputs, _), = trainer.recorded
    mask = inputs["completion_mask"].bool()
    old = brute_force_logprobs(student, inputs, 0.7)
    torch.testing.assert_close(inputs["sampling_per_token_logps"].double()[mask], old[mask], rtol=0, atol=1e-5)
    assert not torch.allclose(inputs["old_per_token_logps"][mask], inputs["sampling_per_token_logps"][mask])


# ---------------------------------------------------------------- every GRPO loss type, and the reference KL


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"])
def test_every_grpo_loss_type_trains_with_the_trrd_ratio(student, teacher, tokenizer, tmp_path, loss_type):
    trainer = rlad(student, teacher, tokenizer, tmp_path, trainer_class=RecordingRLAD, max_steps=2,
                   loss_type=loss_type, epsilon_high=1.5 if loss_type == "cispo" else 0.28)
    trainer.train()
    assert all(math.isfinite(value) for value in logged(trainer, "loss"))
    # GRPO's loss reads its ratio from `old_per_token_logps` for every loss type; with GA 1 GRPO itself leaves that
    # key out, so its presence means the loss saw the TRRD anchor.
    assert all("old_per_token_logps" in inputs for inputs, _ in trainer.recorded)
    assert all(math.isfinite(value) for value in logged(trainer, "rlad/teacher_log_ratio"))
    moved = max((a - b).abs().max().item() for a, b in zip(trainer.model.parameters(), student.parameters()))
    assert moved > 0


def test_reference_kl_with_a_saved_student(tokenizer, teacher, tmp_path):
    path = save_tiny(tmp_path / "student", tokenizer, hidden=32, seed=0)  # GRPO reloads the reference by path
    args = RLADConfig(output_dir=str(tmp_path / "out"), beta=0.1, use_bias_correction_kl=False, **settings())
    trainer = RLADTrainer(path, char_variety_reward, args=args, train_dataset=prompt_dataset(),
                          processing_class=tokenizer, teacher_model=copy.deepcopy(teacher))
    trainer.train()
    assert all(math.isfinite(value) for value in logged(trainer, "loss") + logged(trainer, "kl"))


def test_teacher_loaded_by_path_with_a_wider_padded_head(student, tokenizer, tmp_path):
    """Same tokenizer, teacher head padded to more rows (Qwen2.5-7B vs 1.5B): accepted, loaded from the config."""
    path = save_tiny(tmp_path / "teacher", tokenizer, hidden=48, seed=1, vocab_size=len(tokenizer) + 16)
    args = RLADConfig(output_dir=str(tmp_path / "out"), teacher_model_name_or_path=path,
                      teacher_model_init_kwargs={"dtype": "float32"}, **settings(max_steps=1))
    trainer = RLADTrainer(copy.deepcopy(student), char_variety_reward, args=args, train_dataset=prompt_dataset(),
                          processing_class=tokenizer)
    trainer.train()
    assert trainer.teacher_model.config.vocab_size == len(tokenizer) + 16
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())
    assert math.isfinite(logged(trainer, "rlad/teacher_log_ratio")[0])


# ---------------------------------------------------------------- AAPA anchor reward


@pytest.fixture(scope="module")
def discriminator(tmp_path_factory):
    """A small trained anchor discriminator, and the file it is saved to."""
    path = tmp_path_factory.mktemp("anchor") / "anchor.pt"
    return save_anchor(path), str(path)


def test_aapa_anchor_is_an_added_weighted_reward(student, teacher, tokenizer, tmp_path, discriminator):
    discriminator, path = discriminator
    trainer = rlad(student, teacher, tokenizer, tmp_path, max_steps=1,
                   aapa_discriminator_path=path, aapa_weight=0.25, reward_weights=[2.0])
    assert trainer.reward_func_names == ["char_variety_reward", "anchor_reward"]
    assert trainer.reward_weights.tolist() == [2.0, 0.25]
    trainer.train()
    first = trainer.state.log_history[0]
    task, anchor = first["rewards/char_variety_reward/mean"], first["rewards/anchor_reward/mean"]
    assert abs(anchor) <= discriminator.score_clip
    assert first["reward"] == pytest.approx(2.0 * task + 0.25 * anchor, abs=1e-4)


def test_staged_aapa_weight_follows_the_schedule(student, teacher, tokenizer, tmp_path, discriminator):
    """Staged AAPA: weight 0 before `aapa_start_step`, then a linear ramp (AnchorSchedule), in GRPO's reward sum."""
    trainer = rlad(student, teacher, tokenizer, tmp_path, max_steps=4, logging_steps=1,
                   aapa_discriminator_path=discriminator[1], aapa_weight=0.4, aapa_start_step=1,
                   aapa_ramp_steps=2)
    trainer.train()
    entries = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert len(entries) == 4
    for step, entry in enumerate(entries):  # logged after optimizer step `step` (global_step = step during it)
        weight = [0.0, 0.0, 0.2, 0.4][step]
        task, anchor = entry["rewards/char_variety_reward/mean"], entry["rewards/anchor_reward/mean"]
        assert entry["reward"] == pytest.approx(task + weight * anchor, abs=1e-4), step
    assert any(entry["rewards/anchor_reward/mean"] != 0 for entry in entries)


# ---------------------------------------------------------------- errors before any model is loaded


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr("trl.trainer.grpo_trainer.create_model_from_path", refuse)
    monkeypatch.setattr("trl_opd.trainers.teacher.create_model_from_path", refuse)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"rlad_alpha": 1.5}, r"`rlad_alpha` must be in \[0, 1\], got 1.5"),
        ({"rlad_alpha": -0.1}, "rlad_alpha"),
        ({"rlad_teacher_clamp": 0.0}, "`rlad_teacher_clamp` must be > 0"),
        ({"rlad_teacher_clamp": -1.0}, "rlad_teacher_clamp"),
        ({"rlad_teacher_clamp": float("nan")}, "rlad_teacher_clamp"),
        ({"aapa_weight": float("inf")}, "aapa_weight"),
        ({"beta": 0.1}, "use_bias_correction_kl=False"),
    ],
)
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        RLADConfig(output_dir="unused", **settings(**overrides))


def test_alpha_one_allows_grpo_bias_corrected_kl():
    assert RLADConfig(output_dir="unused", rlad_alpha=1.0, beta=0.1, **settings()).use_bias_correction_kl


def test_teacher_with_another_vocabulary_fails_before_loading(tokenizer, tmp_path, no_loading):
    other = tiny_tokenizer(texts=OTHER_TEXTS, vocab_size=280)
    student_path = save_tiny(tmp_path / "student", tokenizer)
    teacher_path = save_tiny(tmp_path / "teacher", other)
    narrower_path = save_tiny(tmp_path / "narrow", tokenizer, vocab_size=len(tokenizer) - 4)
    args = RLADConfig(output_dir=str(tmp_path / "out"), **settings())
    for teacher_path_ in (teacher_path, narrower_path):
        with pytest.raises(ValueError, match="teacher cannot score the student's tokens"):
            RLADTrainer(student_path, char_variety_reward, args=args, train_dataset=prompt_dataset(),
                        teacher_model=teacher_path_)


def test_same_size_but_different_tokenizer_is_rejected(tmp_path, no_loading):
    first = tiny_tokenizer(vocab_size=280)
    second = tiny_tokenizer(texts=OTHER_TEXTS, vocab_size=280)
    assert len(first) == len(second) and first.get_vocab() != second.get_vocab()
    args = RLADConfig(output_dir=str(tmp_path / "out"), **settings())
    with pytest.raises(ValueError, match="tokenizers are different"):
        RLADTrainer(save_tiny(tmp_path / "s", first), char_variety_reward, args=args, train_dataset=prompt_dataset(),
                    teacher_model=save_tiny(tmp_path / "t", second))


def test_missing_teacher_and_wrong_config_type(student, tmp_path, no_loading):
    with pytest.raises(ValueError, match="needs a teacher"):
        RLADTrainer(student, char_variety_reward, args=RLADConfig(output_dir=str(tmp_path), **settings()))
    with pytest.raises(TypeError, match="needs an RLADConfig"):
        RLADTrainer(student, char_variety_reward, args=GRPOConfig(output_dir=str(tmp_path), **settings()),
                    teacher_model=student)


def test_init_kwargs_for_an_instantiated_teacher_are_rejected(student, tmp_path, no_loading):
    args = RLADConfig(output_dir=str(tmp_path), teacher_model_init_kwargs={"dtype": "float32"}, **settings())
    with pytest.raises(ValueError, match="teacher is already instantiated"):
        RLADTrainer(student, char_variety_reward, args=args, teacher_model=student)


def test_warns_when_a_generation_batch_spans_optimizer_steps(caplog):
    with caplog.at_level("WARNING", logger="trl_opd.trainers.rlad_config"):
        RLADConfig(output_dir="unused", num_iterations=2, **settings())
    assert "behaviour policy" in caplog.text


# ---------------------------------------------------------------- the recipe on two CPU processes


@pytest.mark.multiprocess
def test_recipe_runs_on_two_cpu_processes(tokenizer, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 recipes/rlad.py` (use_cpu=True: gloo) with the toy YAML,
    pointed at tiny models. `--cpu --num_processes 2` would start a single process unless MPI is set up."""
    from trl_opd.testbed import TaskConfig, char_tokenizer, make_dataset

    char = char_tokenizer()
    student_path = save_tiny(tmp_path / "student", char, hidden=32, seed=0)
    teacher_path = save_tiny(tmp_path / "teacher", char, hidden=48, seed=1)
    make_dataset(16, TaskConfig(), seed=0).to_json(tmp_path / "train.jsonl")
    config = yaml.safe_load((REPO / "recipes" / "toy" / "rlad.yaml").read_text())
    for key in ("testbed", "testbed_seed", "testbed_train_size", "testbed_eval_size"):
        config.pop(key, None)
    config.update(model_name_or_path=student_path, teacher_model_name_or_path=teacher_path,
                  dataset_name=str(tmp_path / "train.jsonl"), output_dir=str(tmp_path / "out"), max_steps=2,
                  per_device_train_batch_size=4, num_generations=4, max_completion_length=6, logging_steps=1,
                  disable_tqdm=True, use_cpu=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = launch_two_cpu_processes(Path(__file__).with_name("recipe_2proc_launch.py"), REPO / "recipes" / "rlad.py",
                                      "--config", tmp_path / "config.yaml", cwd=tmp_path, PYTHONPATH=str(REPO))
    logs = [json.loads(line.replace("'", '"')) for line in re.findall(r"^\{'loss'.*\}$", result.stdout, re.M)]
    assert len(logs) == 2, result.stdout[-2000:]
    for entry in logs:
        assert math.isfinite(float(entry["loss"])) and math.isfinite(float(entry["rlad/teacher_log_ratio"]))
    assert (tmp_path / "out" / "model.safetensors").exists()


# ---------------------------------------------------------------- evaluation during training


def test_math_eval_callback_logs_through_rlad(student, teacher, tokenizer, tmp_path):
    """MathEvalCallback on RLADTrainer: its metrics land in the log history at the chosen steps."""
    from datasets import Dataset

    from trl_opd.eval import MathEvalCallback

    problems = Dataset.from_list([{"problem": f"{a}+{a}", "answer": str(2 * a)} for a in range(3)])
    trainer = rlad(student, teacher, tokenizer, tmp_path, max_steps=2)
    trainer.add_callback(MathEvalCallback(trainer, {"toy": problems}, eval_steps=1, n=2, max_new_tokens=4,
                                          prompt_template="{problem}", use_chat_template=False))
    trainer.train()
    entries = [entry for entry in trainer.state.log_history if "math_eval/toy/avg@2" in entry]
    assert [entry["step"] for entry in entries] == [1, 2]
    assert all(entry["math_eval/toy/mean_completion_tokens"] >= 1 for entry in entries)
