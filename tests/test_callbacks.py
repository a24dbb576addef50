"""ForesightCallback (EffOPD, methods.md §9): extrapolation, rollback, anchor, PEFT, logging, resume."""

import copy
import math
import os
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from tiny import cpu_args, prompt_dataset, tiny_model, tiny_tokenizer
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from trl_opd.callbacks import ANCHOR_FILE, ForesightCallback, extrapolate, is_power_of_two, select_parameters


class Toy(nn.Module):
    """Names like a transformer block: two selected modules (self_attn, mlp) and three that never move."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(5, 4)
        self.self_attn = nn.Linear(4, 4)
        self.mlp = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
        self.norm = nn.LayerNorm(4)
        self.lm_head = nn.Linear(4, 3)


SELECTED = {"self_attn.weight", "self_attn.bias", "mlp.0.weight", "mlp.0.bias", "mlp.1.weight", "mlp.1.bias"}


class ScriptedMetric:
    """Returns the given scores in order and records the model's weights at every call."""

    def __init__(self, scores):
        self.scores, self.seen = list(scores), []

    def __call__(self, model):
        self.seen.append({name: tensor.clone() for name, tensor in model.state_dict().items()})
        return self.scores[len(self.seen) - 1]


def weights(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def take_optimizer_step(model, seed):
    """Stand-in for an optimizer step: every parameter moves by a small random amount."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator) * 0.1
            parameter.add_(noise.to(parameter.dtype))


def fake_args(tmp_path):
    return SimpleNamespace(
        output_dir=str(tmp_path), should_save=True, resume_from_checkpoint=None, deepspeed=None
    )


def start(callback, model, tmp_path, step=0):
    state = TrainerState(global_step=step)
    callback.on_train_begin(fake_args(tmp_path), state, TrainerControl(), model=model)
    return state


def trigger(callback, model, state, step, tmp_path):
    state.global_step = step
    return callback.on_step_end(fake_args(tmp_path), state, TrainerControl(), model=model)


# ------------------------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("initial_factor", [2.0, 0.5])
def test_candidates_follow_the_closed_form(tmp_path, initial_factor):
    """k-th candidate = θ_t + k·f₀·(θ_t − θ_a) on selected weights (brute force, float64); the rest stays."""
    model = Toy()
    metric = ScriptedMetric([0.1, 0.2, 0.3, 0.25])  # accept, accept, reject
    callback = ForesightCallback(metric, initial_factor=initial_factor)
    state = start(callback, model, tmp_path)
    anchor = weights(model)
    take_optimizer_step(model, seed=1)
    current = weights(model)
    control = trigger(callback, model, state, 1, tmp_path)

    assert len(metric.seen) == 4 and control.should_log
    for k, seen in enumerate(metric.seen):  # call 0 scores θ_t itself, call k the k-th candidate
        for name, tensor in seen.items():
            if name in SELECTED:
                expected = current[name].double() + k * initial_factor * (
                    current[name].double() - anchor[name].double()
                )
                torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(tensor, current[name]), name
    final = weights(model)
    for name in final:  # the last accepted candidate (k = 2), bit for bit; unselected untouched
        assert torch.equal(final[name], metric.seen[2][name] if name in SELECTED else current[name]), name
    assert callback.history == [
        {
            "step": 1,
            "alpha": pytest.approx(2 * initial_factor),
            "metric_before": 0.1,
            "metric_after": 0.3,
            "trials": 3,
            "eval_seconds": callback.history[0]["eval_seconds"],
        }
    ]
    assert set(callback.anchor) == SELECTED
    for name, tensor in callback.anchor.items():  # the anchor moved to the accepted weights, fp32 on CPU
        assert tensor.device.type == "cpu" and tensor.dtype == torch.float32
        assert torch.equal(tensor, final[name])


def test_next_trigger_extrapolates_from_the_accepted_weights(tmp_path):
    model = Toy()
    callback = ForesightCallback(ScriptedMetric([0.0, 1.0, 0.5]))  # first trigger accepts α = 2
    state = start(callback, model, tmp_path)
    take_optimizer_step(model, seed=1)
    trigger(callback, model, state, 1, tmp_path)
    accepted = weights(model)
    take_optimizer_step(model, seed=2)
    current = weights(model)
    callback.metric_fn = metric = ScriptedMetric([0.0, 1.0, 0.5])
    trigger(callback, model, state, 2, tmp_path)
    for name in SELECTED:
        expected = current[name].double() + 2 * (current[name].double() - accepted[name].double())
        torch.testing.assert_close(metric.seen[1][name].double(), expected, rtol=1e-6, atol=1e-6)


def test_extrapolate_is_fp32_and_casts_back():
    current = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    anchor = torch.tensor([0.5, 2.5, 3.0])
    moved = extrapolate(current, anchor, 2.0)
    assert moved.dtype == torch.bfloat16
    expected = torch.tensor([2.0, 1.0, 3.0]).to(torch.bfloat16)
    assert torch.equal(moved, expected)
    assert extrapolate(current.double(), anchor, 0.5).dtype == torch.float64


def test_all_candidates_accepted_keeps_the_last(tmp_path):
    model = Toy()
    metric = ScriptedMetric([0.0, 0.1, 0.2])
    callback = ForesightCallback(metric, max_trials=2)
    state = start(callback, model, tmp_path)
    anchor = weights(model)
    take_optimizer_step(model, seed=1)
    current = weights(model)
    trigger(callback, model, state, 1, tmp_path)
    assert len(metric.seen) == 3 and callback.history[-1]["alpha"] == pytest.approx(4.0)
    for name in SELECTED:
        expected = current[name].double() + 4 * (current[name].double() - anchor[name].double())
        torch.testing.assert_close(model.state_dict()[name].double(), expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------- rollback


@pytest.mark.parametrize("rejected_score", [0.5, 0.4, math.nan], ids=["equal", "worse", "nan"])
def test_rollback_is_bit_identical(tmp_path, rejected_score):
    """Acceptance is strict: an equal, worse or NaN score restores θ_t exactly, even in bfloat16."""
    model = Toy().to(torch.bfloat16)
    metric = ScriptedMetric([0.5, rejected_score])
    callback = ForesightCallback(metric)
    state = start(callback, model, tmp_path)
    take_optimizer_step(model, seed=1)
    current = weights(model)
    trigger(callback, model, state, 1, tmp_path)
    assert any(not torch.equal(metric.seen[1][name], current[name]) for name in SELECTED)  # it did try
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, current[name]), name
    record = callback.history[-1]
    assert (record["alpha"], record["trials"], record["metric_after"]) == (0.0, 1, 0.5)
    for name, tensor in callback.anchor.items():  # the anchor still moves, to θ_t
        assert torch.equal(tensor, current[name].float())


def test_minimised_metric(tmp_path):
    model = Toy()
    callback = ForesightCallback(ScriptedMetric([1.0, 0.8, 0.9]), greater_is_better=False)
    state = start(callback, model, tmp_path)
    take_optimizer_step(model, seed=1)
    trigger(callback, model, state, 1, tmp_path)
    assert callback.history[-1]["alpha"] == 2.0 and callback.history[-1]["metric_after"] == 0.8


def test_metric_runs_in_eval_mode_without_grad_and_restores_training_mode(tmp_path):
    model = Toy().train()
    observed = []

    def metric(scored):
        observed.append((scored.training, torch.is_grad_enabled()))
        return 0.0

    callback = ForesightCallback(metric)
    state = start(callback, model, tmp_path)
    trigger(callback, model, state, 1, tmp_path)
    assert observed == [(False, False), (False, False)] and model.training


# ------------------------------------------------------------------------------------------- schedule


def test_power_of_two_schedule():
    assert [step for step in range(40) if is_power_of_two(step)] == [1, 2, 4, 8, 16, 32]
    callback = ForesightCallback(lambda model: 0.0, schedule=[3, 10])
    assert [step for step in range(1, 12) if callback.is_trigger_step(step)] == [3, 10]


def test_steps_off_the_schedule_do_nothing(tmp_path):
    model = Toy()
    metric = ScriptedMetric([])
    callback = ForesightCallback(metric)
    state = start(callback, model, tmp_path)
    before = weights(model)
    for step in (3, 5, 6, 7):
        assert not trigger(callback, model, state, step, tmp_path).should_log
    assert metric.seen == [] and all(torch.equal(before[n], t) for n, t in model.state_dict().items())


# ------------------------------------------------------------------------------------------- PEFT


def test_peft_moves_only_adapter_weights(tmp_path):
    from peft import LoraConfig, get_peft_model

    tokenizer = tiny_tokenizer()
    model = get_peft_model(
        tiny_model(tokenizer),
        LoraConfig(
            r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["q_norm"]
        ),
    )
    selected = {name for name, _ in select_parameters(model)}
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert selected and all("lora_A" in name or "lora_B" in name for name in selected)
    # The trainable copy of q_norm matches "self_attn" by name but is no adapter weight: it stays.
    assert any("self_attn.q_norm.modules_to_save" in name for name in trainable - selected)
    metric = ScriptedMetric([0.0, 1.0, 0.0])
    callback = ForesightCallback(metric)
    state = start(callback, model, tmp_path)
    anchor = {name: p.detach().clone() for name, p in model.named_parameters()}
    take_optimizer_step(model, seed=3)
    current = {name: p.detach().clone() for name, p in model.named_parameters()}
    trigger(callback, model, state, 1, tmp_path)
    for name, parameter in model.named_parameters():
        if name in selected:
            expected = current[name].double() + 2 * (current[name].double() - anchor[name].double())
            torch.testing.assert_close(parameter.detach().double(), expected, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(parameter.detach(), current[name]), name


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metric_fn": None}, "needs metric_fn"),
        ({"metric_fn": 0.5}, "needs metric_fn"),
        ({"schedule": "cosine"}, "Unknown schedule"),
        ({"schedule": []}, "empty"),
        ({"schedule": [0, 1]}, ">= 1"),
        ({"schedule": [1.5]}, "integers"),
        ({"schedule": [4, 2]}, "strictly increasing"),
        ({"schedule": [2, 2]}, "strictly increasing"),
        ({"schedule": 8}, "list of optimizer steps"),
        ({"max_trials": 0}, "max_trials"),
        ({"initial_factor": 0.0}, "initial_factor"),
        ({"initial_factor": math.inf}, "initial_factor"),
        ({"parameter_patterns": []}, "parameter_patterns"),
        ({"parameter_patterns": "mlp"}, "parameter_patterns"),
        ({"evaluate_on": "rank0"}, "evaluate_on"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, message):
    options = {"metric_fn": lambda model: 0.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        ForesightCallback(options.pop("metric_fn"), **options)


def test_no_matching_parameter_is_an_error(tmp_path):
    callback = ForesightCallback(lambda model: 0.0, parameter_patterns=["gate_proj"])
    with pytest.raises(ValueError, match="would move nothing"):
        start(callback, Toy(), tmp_path)


def test_metric_must_return_a_number(tmp_path):
    model = Toy()
    callback = ForesightCallback(lambda scored: "good")
    state = start(callback, model, tmp_path)
    with pytest.raises(ValueError, match="must return a number"):
        trigger(callback, model, state, 1, tmp_path)


def test_step_before_train_begin_is_an_error(tmp_path):
    callback = ForesightCallback(lambda model: 0.0)
    with pytest.raises(ValueError, match="before on_train_begin"):
        callback.on_step_end(fake_args(tmp_path), TrainerState(global_step=1), TrainerControl(), model=Toy())


def test_deepspeed_is_refused(tmp_path):
    args = fake_args(tmp_path)
    args.deepspeed = "ds_config.json"
    with pytest.raises(ValueError, match="DeepSpeed"):
        ForesightCallback(lambda model: 0.0).on_train_begin(
            args, TrainerState(), TrainerControl(), model=Toy()
        )


# ------------------------------------------------------------------------------------------- in a Trainer


class OptimizerProbe(TrainerCallback):
    """Deep copies of the optimizer state at each step end (registered before and after ForesightCallback)."""

    def __init__(self):
        self.snapshots = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.snapshots.append(copy.deepcopy(optimizer.state_dict()))


def same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def lm_data():
    tokenizer = tiny_tokenizer()
    texts = [row["prompt"] + row["completion"] for row in prompt_dataset(32)]
    encoded = tokenizer(texts, padding="max_length", max_length=24, truncation=True)
    data = Dataset.from_dict({**encoded, "labels": encoded["input_ids"]})
    validation = {key: torch.tensor(encoded[key][:8]) for key in ("input_ids", "attention_mask")}
    return tokenizer, data, validation


def lm_trainer(tmp_path, lm_data, callbacks, **overrides):
    tokenizer, data, _ = lm_data
    settings = {
        "output_dir": str(tmp_path),
        "use_cpu": True,
        "report_to": "none",
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "logging_steps": 100,
        "save_strategy": "steps",
        "save_steps": 2,
        "disable_tqdm": True,
        "seed": 0,
    }
    settings.update(overrides)
    return Trainer(
        model=tiny_model(tokenizer),
        args=TrainingArguments(**settings),
        train_dataset=data,
        callbacks=callbacks,
    )


def validation_loss(validation):
    def metric(model):
        return model(**validation, labels=validation["input_ids"]).loss.item()

    return metric


def test_in_a_trainer_logs_saves_and_leaves_the_optimizer_alone(tmp_path, lm_data):
    before, after = OptimizerProbe(), OptimizerProbe()
    foresight = ForesightCallback(validation_loss(lm_data[2]), greater_is_better=False)
    trainer = lm_trainer(tmp_path, lm_data, [before, foresight, after])
    trainer.train()

    assert len(before.snapshots) == 4
    assert all(same_state(a, b) for a, b in zip(before.snapshots, after.snapshots))
    logged = [entry for entry in trainer.state.log_history if "foresight/alpha" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 4]
    for entry, record in zip(logged, foresight.history):
        assert (
            entry["foresight/alpha"] == record["alpha"] and "loss" in entry
        )  # merged into the training entry
        assert entry["foresight/metric_after"] <= entry["foresight/metric_before"]
        assert entry["foresight/eval_seconds_total"] > 0
    for step in (2, 4):
        assert os.path.isfile(tmp_path / f"checkpoint-{step}" / ANCHOR_FILE)


def test_resume_restores_the_anchor(tmp_path, lm_data):
    from safetensors.torch import load_file

    first = ForesightCallback(validation_loss(lm_data[2]), greater_is_better=False)
    lm_trainer(tmp_path, lm_data, [first], max_steps=3).train()
    checkpoint = tmp_path / "checkpoint-2"
    # After the trigger at step 2 the anchor is the accepted weights, which checkpoint-2 holds.
    saved_model = load_file(checkpoint / "model.safetensors")

    resumed = ForesightCallback(validation_loss(lm_data[2]), greater_is_better=False)
    trainer = lm_trainer(tmp_path, lm_data, [resumed], max_steps=3)
    restored = {}

    class Spy(TrainerCallback):  # registered after `resumed`: sees the anchor right after on_train_begin
        def on_train_begin(self, *args, **kwargs):
            restored.update({name: tensor.clone() for name, tensor in resumed.anchor.items()})

    trainer.add_callback(Spy())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert set(restored) == {name for name, _ in select_parameters(trainer.model)}
    for name, tensor in restored.items():
        assert torch.equal(tensor, saved_model[name]), name
    assert [record["step"] for record in resumed.history] == [
        1,
        2,
    ]  # restored history, no new trigger at step 3


def test_with_opd_trainer(tmp_path):
    from trl_opd import OPDConfig, OPDTrainer

    tokenizer = tiny_tokenizer()
    foresight = ForesightCallback(lambda model: 0.0)  # never improves: every trigger rolls back
    trainer = OPDTrainer(
        tiny_model(tokenizer, hidden=32, seed=0),
        tiny_model(tokenizer, hidden=48, seed=1),
        args=OPDConfig(output_dir=str(tmp_path), **cpu_args(logging_steps=100)),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
        callbacks=[foresight],
    )
    trainer.train()
    assert [record["step"] for record in foresight.history] == [1, 2]
    assert [e["step"] for e in trainer.state.log_history if "foresight/trials" in e] == [1, 2]
