"""OPDTrainer end to end on tiny models: parity with TRL, reductions under gradient accumulation, GKD mix, PEFT."""

import copy
import dataclasses

import pytest
import torch
from transformers import TrainerCallback
from trl import DistillationConfig, DistillationTrainer

from tiny import cpu_args, prompt_dataset, save_anchor, save_tiny, tiny_model, tiny_tokenizer
from trl_opd import OPDConfig, OPDTrainer
from trl_opd.anchor import AnchorDiscriminator


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def student(tokenizer):
    return tiny_model(tokenizer, hidden=32, seed=0)


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return tiny_model(tokenizer, hidden=48, seed=1)


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def opd(student, teacher, tokenizer, tmp_path, data=None, **overrides):
    args = OPDConfig(output_dir=str(tmp_path / "opd"), **cpu_args(**overrides))
    return OPDTrainer(
        copy.deepcopy(student), copy.deepcopy(teacher), args=args,
        train_dataset=data if data is not None else prompt_dataset(), processing_class=tokenizer,
    )


# ---------------------------------------------------------------- parity with trl.DistillationTrainer


@pytest.mark.parametrize(
    ("divergence", "beta", "implementation"),
    [("reverse_kl", 1.0, "fused"), ("reverse_kl", 1.0, "checkpointed"), ("forward_kl", 0.0, "fused"),
     ("jsd", 0.3, "fused")],
)
def test_same_losses_as_distillation_trainer(student, teacher, tokenizer, tmp_path, divergence, beta, implementation):
    """With every method switch off, OPDTrainer trains exactly like its TRL parent, step by step."""
    settings = cpu_args(max_steps=3, temperature=0.8)
    # Each trainer seeds the RNGs in its constructor: build and train one after the other.
    ours = OPDTrainer(
        copy.deepcopy(student), copy.deepcopy(teacher), processing_class=tokenizer, train_dataset=prompt_dataset(),
        args=OPDConfig(output_dir=str(tmp_path / "a"), divergence=divergence, beta=beta,
                       loss_implementation=implementation, **settings),
    )
    ours.train()
    reference = DistillationTrainer(
        copy.deepcopy(student), copy.deepcopy(teacher), processing_class=tokenizer, train_dataset=prompt_dataset(),
        args=DistillationConfig(output_dir=str(tmp_path / "b"), beta=beta, **settings),
    )
    reference.train()
    assert losses(ours) == pytest.approx(losses(reference), rel=1e-4, abs=1e-7)
    moved = max((a - b).abs().max().item() for a, b in zip(ours.model.parameters(), student.parameters()))
    assert moved > 1e-3  # three Adam steps at lr 1e-3 really changed the student
    for mine, theirs in zip(ours.model.parameters(), reference.model.parameters()):
        # Adam divides by sqrt(v): where a gradient is ~0, float rounding can move one element by a few 1e-5.
        torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=5e-5)


def test_logs_divergence_entropy_and_length(student, teacher, tokenizer, tmp_path):
    trainer = opd(student, teacher, tokenizer, tmp_path)
    trainer.train()
    first = trainer.state.log_history[0]
    for key in ("loss", "opd/divergence", "entropy", "completions/mean_length", "rollout/on_policy"):
        assert key in first, key
    assert first["opd/divergence"] == pytest.approx(first["loss"], rel=1e-5)  # uniform weights, token_mean, GA 1


def test_training_lowers_divergence(student, teacher, tokenizer, tmp_path):
    trainer = opd(student, teacher, tokenizer, tmp_path, max_steps=25, learning_rate=1e-2, max_completion_length=4,
                  temperature=1.0)
    trainer.train()
    divergences = [entry["opd/divergence"] for entry in trainer.state.log_history if "opd/divergence" in entry]
    assert sum(divergences[-5:]) / 5 < 0.7 * sum(divergences[:5]) / 5


# ---------------------------------------------------------------- reductions and gradient accumulation


class GradientRecorder(TrainerCallback):
    """Keeps the accumulated gradient of the first optimizer step."""

    def __init__(self):
        self.gradients = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.gradients is None:
            self.gradients = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def first_step_gradients(student, teacher, tokenizer, tmp_path, **overrides):
    recorder = GradientRecorder()
    # lmbda=0 reads the dataset's completions: identical rollouts whatever the batch layout.
    trainer = opd(student, teacher, tokenizer, tmp_path, max_steps=1, lmbda=0.0, max_completion_length=12,
                  **overrides)
    trainer.add_callback(recorder)
    trainer.train()
    return recorder.gradients, trainer


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_step_reductions_are_invariant_to_gradient_accumulation(student, teacher, tokenizer, tmp_path, reduction):
    one, _ = first_step_gradients(student, teacher, tokenizer, tmp_path / "ga1", loss_reduction=reduction,
                                  per_device_train_batch_size=4, gradient_accumulation_steps=1, shuffle_dataset=False)
    two, _ = first_step_gradients(student, teacher, tokenizer, tmp_path / "ga2", loss_reduction=reduction,
                                  per_device_train_batch_size=2, gradient_accumulation_steps=2, shuffle_dataset=False)
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_microbatch_reductions_average_microbatch_means(student, teacher, tokenizer, tmp_path):
    """token_mean_microbatch = mean over micro-batches of (Σℓ / Σm); with one micro-batch it equals token_mean.
    With two micro-batches whose token counts differ, it differs from token_mean."""
    kw = dict(shuffle_dataset=False, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    micro, _ = first_step_gradients(student, teacher, tokenizer, tmp_path / "m", loss_reduction="token_mean_microbatch",
                                    **kw)
    token, _ = first_step_gradients(student, teacher, tokenizer, tmp_path / "t", loss_reduction="token_mean", **kw)
    weighted, _ = first_step_gradients(student, teacher, tokenizer, tmp_path / "w", loss_reduction="weighted_mean",
                                       **kw)
    for a, b, c in zip(micro, token, weighted):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-7)  # uniform weights: weighted mean = token mean


def test_sequence_mean_equals_its_formula(student, teacher, tokenizer, tmp_path):
    """Loss of the first step, recomputed by hand from per-token divergences of the same batch."""
    trainer = opd(student, teacher, tokenizer, tmp_path, max_steps=1, lmbda=0.0, max_completion_length=12,
                  loss_reduction="sequence_mean", shuffle_dataset=False)
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model
    with torch.no_grad():
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        width = batch["completion_ids"].shape[1]
        student_logits = model(input_ids=ids, attention_mask=attention).logits[:, -width - 1:-1]
        teacher_logits = trainer.teacher_model(input_ids=ids, attention_mask=attention).logits[:, -width - 1:-1]
        log_s, log_t = student_logits.log_softmax(-1), teacher_logits.log_softmax(-1)
        reverse_kl = (log_s.exp() * (log_s - log_t)).sum(-1)
        mask = batch["completion_mask"].float()
        expected = ((reverse_kl * mask).sum(1) / mask.sum(1)).mean()
        trainer.model.eval()  # eval mode: no GA scaling, local normalisers
        loss = trainer.compute_loss(model, batch)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------- GKD on/off-policy mix


def test_lmbda_coin_is_a_function_of_seed_and_step(student, teacher, tokenizer, tmp_path):
    trainer = opd(student, teacher, tokenizer, tmp_path, lmbda=0.5)
    draws = []
    for step in range(40):
        trainer.state.global_step = step
        draws.append(trainer._draw_rollout_source())
    again = []
    for step in range(40):
        trainer.state.global_step = step
        again.append(trainer._draw_rollout_source())
    assert draws == again  # every process computes the same value from (seed, step): no divergence across ranks
    assert {"student", "dataset"} == set(draws)


def test_off_policy_batches_use_dataset_completions(student, teacher, tokenizer, tmp_path):
    data = prompt_dataset(4)
    trainer = opd(student, teacher, tokenizer, tmp_path, data=data, lmbda=0.0, max_completion_length=64)
    batch = trainer._generate_and_score_completions([data[i] for i in range(4)])
    for row, ids, mask in zip(data, batch["completion_ids"], batch["completion_mask"]):
        expected = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert ids[mask.bool()].tolist() == expected
    assert batch["num_items_in_batch"].item() == batch["completion_mask"].sum().item()


def test_seq_kd_generates_with_the_teacher(student, teacher, tokenizer, tmp_path):
    trainer = opd(student, teacher, tokenizer, tmp_path, lmbda=0.0, seq_kd=True, max_steps=2)
    calls = []
    original = type(trainer)._teacher_completion_ids

    def spy(self, prompt_ids):
        calls.append(len(prompt_ids))
        return original(self, prompt_ids)

    type(trainer)._teacher_completion_ids = spy
    try:
        trainer.train()
    finally:
        type(trainer)._teacher_completion_ids = original
    assert calls == [4, 4]
    assert all(entry["rollout/on_policy"] == 0.0 for entry in trainer.state.log_history if "loss" in entry)


# ---------------------------------------------------------------- estimators, top-k, clip


@pytest.mark.parametrize("estimator", ["sampled_pg", "k2", "k3", "k3_plus"])
def test_sampled_token_estimators_train(student, teacher, tokenizer, tmp_path, estimator):
    trainer = opd(student, teacher, tokenizer, tmp_path, estimator=estimator)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert all(torch.isfinite(torch.tensor(value)) for value in losses(trainer))
    assert "opd/kl_k1" in trainer.state.log_history[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_top_k_and_clip_options_train(student, teacher, tokenizer, tmp_path):
    trainer = opd(student, teacher, tokenizer, tmp_path, divergence="forward_kl", loss_top_k=8,
                  loss_top_k_source="teacher", clip=0.05, distillation_temperature=1.1)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(value)) for value in losses(trainer))


# ---------------------------------------------------------------- PEFT


def test_lora_student_trains_only_the_adapter(student, teacher, tokenizer, tmp_path):
    from peft import LoraConfig

    trainer = OPDTrainer(
        copy.deepcopy(student), copy.deepcopy(teacher), processing_class=tokenizer, train_dataset=prompt_dataset(),
        args=OPDConfig(output_dir=str(tmp_path / "lora"), **cpu_args()),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    named = dict(trainer.model.named_parameters())
    before = {name: p.detach().clone() for name, p in named.items()}
    trainer.train()
    changed = {name for name, p in named.items() if not torch.equal(before[name], p)}
    assert changed and all("lora_" in name for name in changed)


# ---------------------------------------------------------------- padded vocabularies


def test_padded_lm_heads_around_one_tokenizer_are_sliced(tokenizer, tmp_path):
    """Qwen-style: the same tokenizer, LM heads padded to different widths (methods.md §0.8)."""
    student_dir = save_tiny(tmp_path / "s", tokenizer, vocab_size=len(tokenizer) + 5)
    teacher_dir = save_tiny(tmp_path / "t", tokenizer, hidden=48, seed=1, vocab_size=len(tokenizer) + 37)
    trainer = OPDTrainer(student_dir, teacher_dir, train_dataset=prompt_dataset(),
                         args=OPDConfig(output_dir=str(tmp_path / "o"), **cpu_args(max_steps=1)))
    assert trainer._loss_vocab_size == len(tokenizer)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(value)) for value in losses(trainer))


# ---------------------------------------------------------------- the AAPA anchor term (methods.md §11.3)


@pytest.fixture(scope="module")
def anchor_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("anchor") / "anchor.pt"
    save_anchor(path)
    return str(path)


def test_aapa_term_gradient_matches_brute_force(student, teacher, tokenizer, tmp_path, anchor_path):
    """The step's gradient with the anchor term minus the gradient without it is −w Σ_{b,t} A_b ∇log π(ŷ_bt) / N
    (token_mean, N the step's tokens, log π at the sampling temperature), recomputed in float64 token by token; the
    advantages are the leave-one-out centred discriminator scores of the decoded completions; the loss is unchanged."""
    weight, temperature = 0.5, 0.8
    trainer = opd(student, teacher, tokenizer, tmp_path, max_steps=1, temperature=temperature,
                  aapa_discriminator_path=anchor_path, aapa_weight=weight)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(4)])
    mask = batch["completion_mask"].bool()
    texts = [tokenizer.decode(ids[row], skip_special_tokens=True) for ids, row in zip(batch["completion_ids"], mask)]
    scores = AnchorDiscriminator.load(anchor_path).score(texts)
    expected_advantages = [s - (sum(scores) - s) / (len(scores) - 1) for s in scores]
    torch.testing.assert_close(batch["aapa_advantages"], torch.tensor(expected_advantages))
    assert batch["aapa_advantages"].abs().max() > 1e-3

    def step_gradient(objective):
        trainer.objective = objective
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.double().clone() for n, p in trainer.model.named_parameters()}

    with_term = trainer.objective
    loss_on, on = step_gradient(with_term)
    loss_off, off = step_gradient(dataclasses.replace(with_term, anchor=None))
    assert loss_on.item() == loss_off.item()  # the term adds a gradient, no value
    model = copy.deepcopy(student).double()
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    width = batch["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -width - 1:-1]
    num_tokens = int(mask.sum())
    surrogate = 0.0
    for b in range(mask.shape[0]):
        for t in range(width):
            if mask[b, t]:
                log_probs = torch.log_softmax(logits[b, t] / temperature, -1)
                surrogate = surrogate - weight * expected_advantages[b] * log_probs[batch["completion_ids"][b, t]] \
                    / num_tokens
    names = list(on)
    expected = torch.autograd.grad(surrogate, [dict(model.named_parameters())[n] for n in names])
    ours = torch.cat([(on[n] - off[n]).flatten() for n in names])
    expected = torch.cat([g.flatten() for g in expected])
    assert expected.norm() > 1e-4
    assert ((ours - expected).norm() / expected.norm()).item() < 1e-4


def test_aapa_staging_and_student_rollouts_only(student, teacher, tokenizer, tmp_path, anchor_path):
    trainer = opd(student, teacher, tokenizer, tmp_path, max_steps=4, aapa_discriminator_path=anchor_path,
                  aapa_weight=0.4, aapa_start_step=1, aapa_ramp_steps=2)
    trainer.train()
    entries = [entry for entry in trainer.state.log_history if "aapa/weight" in entry]
    assert [entry["aapa/weight"] for entry in entries] == pytest.approx([0.0, 0.0, 0.2, 0.4])
    assert all(abs(entry["aapa/score"]) <= 5 and 0 < entry["aapa/probability"] < 1 for entry in entries)

    mixed = opd(student, teacher, tokenizer, tmp_path / "mixed", max_steps=1, lmbda=0.5,
                aapa_discriminator_path=anchor_path)
    mixed.model.train()
    mixed._draw_rollout_source = lambda: "dataset"  # an off-policy batch: no anchor term
    batch = mixed._generate_and_score_completions([mixed.train_dataset[i] for i in range(4)])
    assert batch["aapa_advantages"].eq(0).all()


def test_aapa_term_is_refused_where_it_cannot_run(anchor_path):
    for settings in ({"lmbda": 0.0}, {"representation_weight": 1.0, "logit_weight": 0.0}):
        with pytest.raises(ValueError, match="aapa_discriminator_path"):
            OPDConfig(output_dir="unused", aapa_discriminator_path=anchor_path, **cpu_args(**settings))
    with pytest.raises(ValueError, match="aapa_start_step"):
        OPDConfig(output_dir="unused", aapa_discriminator_path=anchor_path, aapa_start_step=-1, **cpu_args())


def test_a_teacher_given_by_path_loads_in_its_own_dtype_like_trls(tmp_path):
    """Issue 18: with `teacher_model_init_kwargs` unset, DistillationTrainer loads the teacher with transformers'
    default dtype (the checkpoint's: bf16 for real checkpoints); OPDTrainer loaded it in float32 (twice the memory)."""
    tokenizer = tiny_tokenizer()
    teacher_dir = tmp_path / "bf16-teacher"
    tiny_model(tokenizer, hidden=48, seed=1).to(torch.bfloat16).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    dtypes = {}
    for name, config_class, trainer_class in (("trl", DistillationConfig, DistillationTrainer),
                                              ("ours", OPDConfig, OPDTrainer)):
        args = config_class(output_dir=str(tmp_path / name), **cpu_args())
        trainer = trainer_class(tiny_model(tokenizer), str(teacher_dir), args=args, train_dataset=prompt_dataset(8),
                                processing_class=tokenizer)
        dtypes[name] = next(trainer.accelerator.unwrap_model(trainer.teacher_model).parameters()).dtype
    assert dtypes == {"trl": torch.bfloat16, "ours": torch.bfloat16}
