"""OPRD in the trainer (methods.md §6): capture, loss against brute force, modes, projector, PEFT, checkpoints, DDP.

`OPDConfig` / `OPDTrainer` include OPRD through `RepresentationArguments` / `RepresentationDistillationMixin`.
The DDP test launches this file as a script under `accelerate launch` (2 CPU processes, gloo).
"""

import copy
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from tiny import cpu_args, end_distributed_run, launch_two_cpu_processes, prompt_dataset, tiny_model, tiny_tokenizer
from trl_opd import OPDConfig, OPDTrainer
from trl_opd.trainers import opd_trainer
from trl_opd.trainers.oprd import (
    PROJECTOR_FILE,
    RepresentationArguments,
    RepresentationDistillationMixin,
    completion_positions,
)

HERE = Path(__file__).resolve()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def student(tokenizer):
    return tiny_model(tokenizer, hidden=32, layers=2, seed=0)


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return tiny_model(tokenizer, hidden=48, layers=3, seed=1)  # other width and depth


def oprd(student, teacher, tokenizer, tmp_path, peft_config=None, data=None, **overrides):
    settings = {"representation_weight": 1.0, **cpu_args(), **overrides}
    args = OPDConfig(output_dir=str(tmp_path / "oprd"), **settings)
    teacher = teacher if isinstance(teacher, str) else copy.deepcopy(teacher)
    return OPDTrainer(
        copy.deepcopy(student), teacher, args=args, processing_class=tokenizer, peft_config=peft_config,
        train_dataset=data if data is not None else prompt_dataset(),
    )


def fixed_batch(trainer, rows=4):
    """A batch of the dataset's completions (lmbda=0): varied lengths, reproducible."""
    return trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(rows)])


def with_privileged_teacher_prompt(batch, extra_ids):
    """Give the teacher a longer prompt (`extra_ids` before each row's real prompt tokens), left-padded."""
    rows = [extra_ids + ids[mask.bool()].tolist() for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"])]
    width = max(len(row) for row in rows)
    batch = dict(batch)
    batch["teacher_prompt_ids"] = torch.tensor([[0] * (width - len(row)) + row for row in rows])
    batch["teacher_prompt_mask"] = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return batch


def all_hidden_states(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """HF `hidden_states` of the full model on [prompt ‖ completion], positions cumsum(mask) − 1 (§0.8)."""
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       output_hidden_states=True)
    return [state.double() for state in output.hidden_states]


def side_states(model, batch, teacher=False):
    prefix = "teacher_" if teacher and "teacher_prompt_ids" in batch else ""
    states = all_hidden_states(model, batch[f"{prefix}prompt_ids"], batch[f"{prefix}prompt_mask"],
                               batch["completion_ids"], batch["completion_mask"])
    return states, batch[f"{prefix}prompt_ids"].shape[1]


def kept_completion_indices(mask_row, last_k):
    indices = [j for j in range(len(mask_row)) if mask_row[j]]
    return indices if last_k is None else indices[-last_k:]


def brute_force_oprd(student_states, teacher_states, layer_pairs, mask, widths, projections=None, last_k=None,
                     normalize=False, offset=-1):
    """Eq. 6 by loops: per layer pair, the mean over kept (b, t) of (1/d)‖W h_S − h_T‖², then the mean over layers.
    Completion token t is represented at prompt_width + offset + t on each side: −1, the state that predicts it
    (trl_opd's default); 0, the state at the token (the reference code's `hidden_states[:, -R:]`)."""
    student_width, teacher_width = widths
    layer_losses = []
    for pair, (student_index, teacher_index) in enumerate(layer_pairs):
        total, count = 0.0, 0
        for b in range(mask.shape[0]):
            for t in kept_completion_indices(mask[b].tolist(), last_k):
                s = student_states[student_index][b, student_width + offset + t]
                if projections is not None:
                    s = projections[pair].double() @ s
                h = teacher_states[teacher_index][b, teacher_width + offset + t]
                if normalize:
                    s, h = s / s.norm(), h / h.norm()
                total += ((s - h) ** 2).sum().item() / s.shape[0]
                count += 1
        layer_losses.append(total / count)
    return sum(layer_losses) / len(layer_losses)


def projection_weights(trainer):
    return [linear.weight.detach() for linear in trainer.representation_projector.projections]


# ------------------------------------------------------------------------------------------------ config


def test_opd_classes_include_oprd():
    assert issubclass(OPDConfig, RepresentationArguments) and issubclass(OPDTrainer, RepresentationDistillationMixin)
    # The mixin wraps the core's `_compute_loss`, so it must come first in the MRO.
    assert OPDTrainer.__mro__[1] is RepresentationDistillationMixin


def test_config_defaults_compose_with_other_configs(tmp_path):
    from trl import DistillationConfig

    @dataclass
    class LeadStyleConfig(RepresentationArguments, DistillationConfig):  # the mixin on TRL's own config
        pass

    for config_class in (OPDConfig, LeadStyleConfig):
        args = config_class(output_dir=str(tmp_path), use_cpu=True, report_to="none")
        assert args.representation_weight == 0.0 and args.logit_weight == 1.0
        assert args.representation_layers == "all" and args.representation_positions == "last_k"
        assert args.effective_representation_normalize is False
    args = OPDConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", representation_weight=1.0,
                   logit_weight=0.0, representation_layers="3,1", projector="bridge", allow_random_projector=True)
    assert args.representation_layers == [3, 1]
    assert args.effective_representation_normalize is True  # the Bridge loss (Eq. 15)
    assert args.ddp_find_unused_parameters is True  # representation-only: the LM head gets no gradient


def test_config_parses_from_the_command_line(tmp_path):
    from trl import TrlParser

    (args,) = TrlParser((OPDConfig,)).parse_args_and_config(
        ["--output_dir", str(tmp_path), "--representation_weight", "0.5", "--representation_layers", "1,2",
         "--representation_normalize", "true", "--use_cpu", "true", "--report_to", "none"]
    )
    assert (args.representation_weight, args.representation_layers, args.representation_normalize) == (
        0.5, [1, 2], True)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"representation_weight": -1.0}, "representation_weight"),
        ({"representation_weight": 0.0, "logit_weight": 0.0}, "leave no loss"),
        ({"representation_layers": "middle"}, "not a layer specification"),
        ({"representation_positions": "first_k"}, "representation_positions"),
        ({"representation_last_k": 0}, "representation_last_k"),
        ({"projector": "mlp"}, "Unknown `projector`"),
        ({"bridge_path": "x.safetensors"}, "projector='bridge' only"),
        ({"projector": "bridge", "bridge_path": "/nonexistent.safetensors"}, "is not a file"),
        ({"logit_weight": 0.0, "token_selection": "tip_soft_or"}, "token_selection"),
        ({"representation_position_convention": "after"}, "Unknown `representation_position_convention`"),
        ({"representation_layer_map": "authors"}, "Unknown `representation_layer_map`"),
        ({"representation_layer_map": "selected", "representation_layers": "1,2"}, "give the teacher no list"),
    ],
)
def test_config_rejects_bad_input(tmp_path, overrides, match):
    settings = {"representation_weight": 1.0, **overrides}
    with pytest.raises(ValueError, match=match):
        OPDConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **settings)


# ------------------------------------------------------------------------------------------------ capture and loss


def test_completion_positions_point_at_the_predicting_states():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    positions, position_mask = completion_positions(mask, prompt_width=5, last_k=2)
    assert positions[position_mask].tolist() == [5, 6, 4, 5]  # token t is predicted at P − 1 + t
    at_token, at_token_mask = completion_positions(mask, prompt_width=5, last_k=2, convention="at_token")
    assert at_token[at_token_mask].tolist() == [6, 7, 5, 6] and torch.equal(at_token_mask, position_mask)  # P + t
    with pytest.raises(ValueError, match="prompt width"):
        completion_positions(mask, prompt_width=0)
    assert completion_positions(mask, prompt_width=0, convention="at_token")[0][0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="Unknown position convention"):
        completion_positions(mask, prompt_width=5, convention="after")


@pytest.mark.parametrize(("convention", "offset"), [("predicting", -1), ("at_token", 0)])
@pytest.mark.parametrize(
    ("layers", "layer_map", "pairs"),
    [
        ("all", "depth", [(1, 1), (2, 3)]),  # Eq. 11 for 2 → 3 layers: 0→0, 1→2 (0-indexed)
        ("odd", "depth", [(2, 3)]),  # the student's post-final-norm state with the teacher's
        ("odd", "selected", [(2, 2)]),  # the reference map: the teacher's own odd list is [2]
    ],
)
def test_trainer_capture_equals_output_hidden_states(student, teacher, tokenizer, tmp_path, convention, offset,
                                                     layers, layer_map, pairs):
    """The step's hooks give the states `output_hidden_states` gives at the chosen positions (predicting: P − 1 + t;
    at the token: P + t, the reference code's `hidden_states[:, -R:]`) and layers, each side sliced from its own
    prompt width (the teacher here sees a longer, privileged prompt)."""
    trainer = oprd(student, teacher, tokenizer, tmp_path, lmbda=0.0, max_completion_length=12, logit_weight=0.0,
                   representation_layers=layers, representation_last_k=3,
                   representation_position_convention=convention, representation_layer_map=layer_map)
    batch = with_privileged_teacher_prompt(fixed_batch(trainer), extra_ids=[5, 6, 7])
    captured_student, captured_teacher, position_mask = trainer._capture_states(trainer.model, batch)
    plan = trainer._representation_plan
    assert list(zip(plan.student_layers, plan.teacher_layers)) == pairs
    assert [tuple(state.shape[1:]) for state in captured_student + captured_teacher] == (
        [(3, 32)] * len(pairs) + [(3, 48)] * len(pairs))
    student_states, student_width = side_states(trainer.model, batch)
    teacher_states, teacher_width = side_states(trainer.teacher_model, batch, teacher=True)
    assert teacher_width == student_width + 3
    for captured, states, layer_list, width in (
        (captured_student, student_states, [s for s, _ in pairs], student_width),
        (captured_teacher, teacher_states, [t for _, t in pairs], teacher_width),
    ):
        for state, index in zip(captured, layer_list):
            for b in range(position_mask.shape[0]):
                kept = kept_completion_indices(batch["completion_mask"][b].tolist(), 3)
                expected = states[index][b, [width + offset + t for t in kept]]
                torch.testing.assert_close(state[b][position_mask[b]].double(), expected, rtol=1e-5, atol=1e-6)
    # The loss of the step is Eq. 6 on those states.
    expected_loss = brute_force_oprd(student_states, teacher_states, pairs, batch["completion_mask"],
                                     (student_width, teacher_width), projections=projection_weights(trainer),
                                     last_k=3, offset=offset)
    trainer.model.eval()
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(expected_loss, rel=1e-5)


@pytest.mark.parametrize(("positions", "normalize"), [("all", False), ("last_k", True)])
def test_loss_equals_brute_force_in_every_mode(student, teacher, tokenizer, tmp_path, positions, normalize):
    """Representation-only, combined (logit_weight · L_OPD + μ · L_OPRD) and the GA scaling, against Eq. 6 by loops."""
    mu, last_k = 0.7, 2
    common = dict(lmbda=0.0, max_completion_length=12, representation_weight=mu, representation_layers="all",
                  representation_positions=positions, representation_last_k=last_k,
                  representation_normalize=normalize)
    trainer = oprd(student, teacher, tokenizer, tmp_path / "only", logit_weight=0.0, **common)
    batch = with_privileged_teacher_prompt(fixed_batch(trainer), extra_ids=[9, 4])
    student_states, student_width = side_states(trainer.model, batch)
    teacher_states, teacher_width = side_states(trainer.teacher_model, batch, teacher=True)
    expected = mu * brute_force_oprd(
        student_states, teacher_states, [(1, 1), (2, 3)], batch["completion_mask"], (student_width, teacher_width),
        projections=projection_weights(trainer), last_k=last_k if positions == "last_k" else None,
        normalize=normalize,
    )
    trainer.model.eval()  # eval: no gradient-accumulation scaling
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(expected, rel=1e-5)

    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2  # the parent reports GA-scaled losses
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(expected / 2, rel=1e-5)

    # Combined: the same projector (same seed) plus half the OPD loss of a run without OPRD.
    combined = oprd(student, teacher, tokenizer, tmp_path / "both", logit_weight=0.5, **common)
    logit_only = oprd(student, teacher, tokenizer, tmp_path / "opd", **{**common, "representation_weight": 0.0})
    for model in (combined.model, logit_only.model):
        model.eval()
    torch.testing.assert_close(projection_weights(combined), projection_weights(trainer))
    total = combined.compute_loss(combined.model, batch).item()
    opd_loss = logit_only.compute_loss(logit_only.model, batch).item()
    assert opd_loss > 0
    assert total == pytest.approx(0.5 * opd_loss + expected, rel=1e-5)
    assert combined._metrics["eval"]["oprd/loss"][-1] == pytest.approx(expected / mu, rel=1e-5)


def record_representation_inputs(trainer):
    """Wrap the objective's OPRD term to keep the (unprojected) states it receives."""
    recorded = {}
    term = trainer.objective.representation

    class RecordingTerm(type(term)):
        def __call__(self, states, stats):
            recorded.update(student=states.student, teacher=states.teacher, mask=states.position_mask)
            return super().__call__(states, stats)

    trainer.objective = dataclasses.replace(trainer.objective, representation=RecordingTerm(**vars(term)))
    return recorded


def test_combined_mode_captures_the_logit_forwards_states_on_mapped_layers_only(student, teacher, tokenizer,
                                                                                 tmp_path):
    """Combined mode (logit_weight > 0): the states come from the very forwards the OPD loss runs (one student and
    one teacher backbone pass, no extra forward), equal `output_hidden_states` at the predicting positions on each
    side (the teacher with a longer, privileged prompt), and only the mapped layers carry hooks during the step."""
    trainer = oprd(student, teacher, tokenizer, tmp_path, lmbda=0.0, max_completion_length=12, logit_weight=1.0,
                   representation_layers="all", representation_last_k=3)
    batch = with_privileged_teacher_prompt(fixed_batch(trainer), extra_ids=[5, 6, 7])
    recorded = record_representation_inputs(trainer)
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    student_states, student_width = side_states(trainer.model, batch)
    teacher_states, teacher_width = side_states(trainer.teacher_model, batch, teacher=True)
    for captured, states, layers, width in (
        (recorded["student"], student_states, [1, 2], student_width),
        (recorded["teacher"], teacher_states, [1, 3], teacher_width),
    ):
        assert len(captured) == len(layers)
        for state, index in zip(captured, layers):
            for b in range(recorded["mask"].shape[0]):
                kept = kept_completion_indices(batch["completion_mask"][b].tolist(), 3)
                expected = states[index][b, [width - 1 + t for t in kept]]
                torch.testing.assert_close(state[b][recorded["mask"][b]].double(), expected, rtol=1e-5, atol=1e-6)
    assert recorded["student"][0].requires_grad and not recorded["teacher"][0].requires_grad

    # Hooks during the step's forwards: one per mapped layer on each model, none elsewhere; one forward each.
    trainer = oprd(student, teacher, tokenizer, tmp_path / "one", lmbda=0.0, max_completion_length=12,
                   logit_weight=1.0, representation_layers="1")  # student layer 1 -> teacher layer 1 (Eq. 11)
    seen = {"student": [], "teacher": []}
    for role, model in (("student", trainer.model), ("teacher", trainer.teacher_model)):
        stack = model.model

        def count_hooks(module, args, role=role, stack=stack):
            seen[role].append([len(layer._forward_hooks) for layer in stack.layers] + [len(stack.norm._forward_hooks)])

        stack.layers[0].register_forward_pre_hook(count_hooks)
    trainer.compute_loss(trainer.model, fixed_batch(trainer))
    assert seen == {"student": [[1, 0, 0]], "teacher": [[1, 0, 0, 0]]}


def test_combined_mode_with_the_student_as_teacher_is_exactly_zero(student, tokenizer, tmp_path):
    """A teacher identical to the student: in combined mode both losses, the logged divergence and OPRD loss, and
    every gradient are exactly 0 (a capture off by one position, from another forward or from the wrong model
    would make the OPRD term non-zero)."""
    trainer = oprd(student, student, tokenizer, tmp_path, logit_weight=1.0, representation_layers="all",
                   representation_positions="all", max_completion_length=12)
    assert trainer.representation_projector is None
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, fixed_batch(trainer))
    loss.backward()
    assert loss.item() == 0.0
    assert trainer._metrics["train"]["oprd/loss"][-1] == 0.0 and trainer._metrics["train"]["opd/divergence"][-1] == 0.0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in trainer.model.parameters())


def test_combined_gradient_is_the_sum_of_the_opd_and_oprd_gradients(student, teacher, tokenizer, tmp_path):
    """Train mode, one batch: ∇(L_OPD + μ·L_OPRD) in combined mode equals ∇L_OPD of an OPD run plus μ·∇L_OPRD of a
    representation-only run (same projector initialisation), parameter by parameter, so the combined mode adds
    nothing and loses nothing: no state from another forward, no detached term."""
    mu = 0.7
    common = dict(lmbda=0.0, max_completion_length=12, representation_layers="all", representation_positions="all")
    gradients = {}
    batch = None
    for name, weights in (("opd", (1.0, 0.0)), ("oprd", (0.0, mu)), ("both", (1.0, mu))):
        trainer = oprd(student, teacher, tokenizer, tmp_path / name, logit_weight=weights[0],
                       representation_weight=weights[1], **common)
        batch = batch if batch is not None else fixed_batch(trainer)
        trainer.model.train()
        trainer.compute_loss(trainer.model, batch).backward()
        gradients[name] = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert any(name.startswith("oprd_projector") for name in gradients["both"])
    for name, gradient in gradients["both"].items():
        expected = sum(gradients[run][name] for run in ("opd", "oprd") if name in gradients[run])
        torch.testing.assert_close(gradient, expected, rtol=1e-4, atol=1e-7)


def test_representation_only_never_runs_the_student_lm_head(student, teacher, tokenizer, tmp_path, monkeypatch):
    """The update phase (loss + backward) of representation-only OPRD never touches the student's LM head (rollout
    generation does, so the guards go up after it)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the LM head was used")

    for logit_weight in (0.0, 1.0):
        trainer = oprd(student, teacher, tokenizer, tmp_path / str(logit_weight), logit_weight=logit_weight)
        batch = fixed_batch(trainer)
        with monkeypatch.context() as patch:
            trainer.model.lm_head.register_forward_hook(refuse)
            patch.setattr(opd_trainer, "output_head", refuse)  # the chunked OPD loss reads the head through this
            if logit_weight > 0:
                with pytest.raises(AssertionError, match="LM head was used"):  # the check can fail
                    trainer.compute_loss(trainer.model, batch)
                continue
            trainer.compute_loss(trainer.model, batch).backward()
        assert trainer.model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
        assert "entropy" not in trainer._metrics["train"]  # no fake entropy without the head
        assert trainer._metrics["train"]["oprd/loss"]


def test_projector_is_trained_with_the_student(student, teacher, tokenizer, tmp_path):
    trainer = oprd(student, teacher, tokenizer, tmp_path, logit_weight=0.0, max_steps=3)
    projector = trainer.representation_projector
    assert trainer.model.oprd_projector is projector  # a submodule: optimizer, DDP, clipping, checkpoints
    before = [weight.clone() for weight in projection_weights(trainer)]
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in projector.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, projection_weights(trainer)))
    losses = [entry["oprd/loss"] for entry in trainer.state.log_history if "oprd/loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_oprd_lowers_the_representation_loss(student, teacher, tokenizer, tmp_path):
    trainer = oprd(student, teacher, tokenizer, tmp_path, logit_weight=0.0, max_steps=20, learning_rate=1e-2,
                   lr_scheduler_type="constant", max_completion_length=4)
    trainer.train()
    losses = [entry["oprd/loss"] for entry in trainer.state.log_history if "oprd/loss" in entry]
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4


# ------------------------------------------------------------------------------------------------ PEFT


def lora(**overrides):
    from peft import LoraConfig

    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return LoraConfig(**{**settings, **overrides})


def test_lora_student_trains_only_the_adapter_and_the_projector(student, teacher, tokenizer, tmp_path):
    trainer = oprd(student, teacher, tokenizer, tmp_path, peft_config=lora(), logit_weight=0.5)
    named = dict(trainer.model.named_parameters())
    before = {name: p.detach().clone() for name, p in named.items()}
    trainer.train()
    changed = {name for name, p in named.items() if not torch.equal(before[name], p)}
    assert any("lora_" in name for name in changed) and any("oprd_projector" in name for name in changed)
    assert all("lora_" in name or "oprd_projector" in name for name in changed)

    from safetensors.torch import load_file

    trainer.save_model(str(tmp_path / "saved"))  # the adapter as usual, the projector next to it
    adapter = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    assert adapter and not any("oprd_projector" in key for key in adapter)
    saved = load_file(tmp_path / "saved" / PROJECTOR_FILE)
    torch.testing.assert_close([saved[f"projections.{i}.weight"] for i in range(2)], projection_weights(trainer))


def test_peft_self_teacher_pairs_adapted_and_base_states(student, tokenizer, tmp_path):
    """teacher_model='self' with LoRA: the same modules run both roles (adapter on, then off); the capture keeps them
    apart. The teacher sees a privileged prompt (the completion column as context), paired by completion position."""
    trainer = oprd(student, "self", tokenizer, tmp_path, peft_config=lora(), logit_weight=0.0, lmbda=0.0,
                   max_completion_length=12, representation_layers="last", representation_positions="all",
                   use_teacher_context=True, teacher_context_column="completion")
    assert trainer.representation_projector is None  # same width
    for name, parameter in trainer.model.named_parameters():
        if "lora_B" in name:  # the adapter must change the states, or both roles would coincide
            torch.nn.init.normal_(parameter, std=0.5)
    batch = fixed_batch(trainer)
    assert batch["teacher_prompt_ids"].shape[1] > batch["prompt_ids"].shape[1]
    trainer.model.eval()
    student_states, student_width = side_states(trainer.model, batch)
    with trainer.model.disable_adapter():
        teacher_states, teacher_width = side_states(trainer.model, batch, teacher=True)
    expected = brute_force_oprd(student_states, teacher_states, [(2, 2)], batch["completion_mask"],
                                (student_width, teacher_width))
    assert expected > 1e-3
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------------ checkpoints


class ProjectorAtTrainBegin(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.weights = trainer, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.weights = [weight.clone() for weight in projection_weights(self.trainer)]


def test_saved_model_loads_cleanly_and_resume_restores_the_projector(student, teacher, tokenizer, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    trainer = oprd(student, teacher, tokenizer, tmp_path / "a", logit_weight=0.0, save_strategy="steps",
                   save_steps=2, max_steps=2)
    trainer.train()
    checkpoint = tmp_path / "a" / "oprd" / "checkpoint-2"
    trained = projection_weights(trainer)
    saved = load_file(checkpoint / PROJECTOR_FILE)
    torch.testing.assert_close([saved[f"projections.{i}.weight"] for i in range(2)], trained)
    reloaded, info = AutoModelForCausalLM.from_pretrained(checkpoint, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    for name, parameter in reloaded.state_dict().items():
        torch.testing.assert_close(parameter, trainer.model.state_dict()[name])

    resumed = oprd(student, teacher, tokenizer, tmp_path / "a", logit_weight=0.0, max_steps=3, seed=1)
    assert not torch.equal(projection_weights(resumed)[0], trained[0])  # a different fresh initialisation
    restored = ProjectorAtTrainBegin(resumed)
    resumed.add_callback(restored)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    torch.testing.assert_close(restored.weights, trained)
    assert resumed.state.global_step == 3


# ------------------------------------------------------------------------------------------------ errors


def test_bad_models_give_clear_errors(student, teacher, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="hidden size is 32 and the teacher's 48"):
        oprd(student, teacher, tokenizer, tmp_path, projector="none")
    with pytest.raises(ValueError, match="out of range"):
        oprd(student, teacher, tokenizer, tmp_path, representation_layers="1,3")
    hidden_layers = copy.deepcopy(teacher)
    hidden_layers.model._modules["decoder_stack"] = hidden_layers.model._modules.pop("layers")
    with pytest.raises(ValueError, match="Teacher: Cannot find the decoder layers"):
        oprd(student, hidden_layers, tokenizer, tmp_path)
    trainer = oprd(student, teacher, tokenizer, tmp_path, projector="bridge", bridge_rank=2, bridge_fit_prompts=0)
    with pytest.raises(ValueError, match="no fitted bridge"):
        trainer.train()


# ------------------------------------------------------------------------------------------------ OPRD-Bridge


def test_bridge_is_fitted_at_train_start_stays_frozen_and_reloads(student, teacher, tokenizer, tmp_path):
    trainer = oprd(student, teacher, tokenizer, tmp_path / "fit", projector="bridge", bridge_rank=2,
                   bridge_fit_prompts=8, representation_weight=10.0, logit_weight=0.0,
                   representation_positions="all")
    bridge = trainer.representation_projector
    assert list(bridge.parameters()) == []  # frozen: buffers only, nothing for the optimizer
    fits = []
    original_fit = bridge.fit_student

    def fit_student(student_rows, teacher_rows):
        original_fit(student_rows, teacher_rows)
        fits.append((len(student_rows[0]), {name: b.clone() for name, b in bridge.state_dict().items()}))

    bridge.fit_student = fit_student
    trainer.train()  # Stage 1 first (8 prompts = 2 batches of 4), then 2 steps
    assert len(fits) == 1 and fits[0][0] > 8 and bool(bridge.teacher_fitted)
    fitted = fits[0][1]
    for name, buffer in bridge.state_dict().items():  # training left the bridge as fitted
        torch.testing.assert_close(buffer, fitted[name])
    losses = [entry["oprd/loss"] for entry in trainer.state.log_history if "oprd/loss" in entry]
    assert losses and all(0 < value < 1 for value in losses)  # normalised states: the Bridge loss is small
    trainer.save_model(str(tmp_path / "saved"))
    reused = oprd(student, teacher, tokenizer, tmp_path / "reuse", projector="bridge", bridge_rank=2,
                  bridge_path=str(tmp_path / "saved" / PROJECTOR_FILE))
    for name, buffer in reused.representation_projector.state_dict().items():
        torch.testing.assert_close(buffer, fitted[name])
    reused.train()  # fitted already: no Stage 1
    for name, buffer in reused.representation_projector.state_dict().items():
        torch.testing.assert_close(buffer, fitted[name])


def test_random_bridge_fits_the_teacher_pca_on_the_first_batch(student, teacher, tokenizer, tmp_path):
    trainer = oprd(student, teacher, tokenizer, tmp_path, projector="bridge", bridge_rank=2,
                   allow_random_projector=True, max_steps=1)
    assert not bool(trainer.representation_projector.teacher_fitted)
    trainer.train()
    assert bool(trainer.representation_projector.teacher_fitted)
    assert not bool(trainer.representation_projector.student_fitted)


# ------------------------------------------------------------------------------------------------ DDP


@pytest.mark.multiprocess
def test_projector_gradients_are_synchronised_across_two_processes(tmp_path):
    launch_two_cpu_processes(HERE, tmp_path, timeout=170)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["distributed_type"] == "DistributedType.MULTI_CPU"
    for mode in ("representation_only", "combined"):
        local = [torch.tensor(report[mode]["local_grad"]) for report in ranks]
        synced = [torch.tensor(report[mode]["synced_grad"]) for report in ranks]
        assert not torch.allclose(local[0], local[1])  # each process saw its own rollouts
        torch.testing.assert_close(synced[0], synced[1])
        torch.testing.assert_close(synced[0], (local[0] + local[1]) / 2, rtol=1e-4, atol=1e-7)  # DDP's mean
        assert ranks[0][mode]["final_weights"] == ranks[1][mode]["final_weights"]


class GradientProbe(TrainerCallback):
    """The projector's first-layer gradient before DDP's all-reduce (a tensor hook) and after (pre-step)."""

    def __init__(self, projector):
        self.local, self.synced = None, None
        projector.projections[0].weight.register_hook(self._record_local)
        self.weight = projector.projections[0].weight

    def _record_local(self, grad):
        if self.local is None:
            self.local = grad.detach().clone()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.synced is None:
            self.synced = self.weight.grad.detach().clone()


def _distributed_run(out_dir: Path) -> None:
    from accelerate import PartialState

    state = PartialState(cpu=True)
    tokenizer = tiny_tokenizer()
    student, teacher = tiny_model(tokenizer, hidden=32), tiny_model(tokenizer, hidden=48, layers=3, seed=1)
    report = {"distributed_type": str(state.distributed_type)}
    for mode, logit_weight in (("representation_only", 0.0), ("combined", 1.0)):
        trainer = oprd(student, teacher, tokenizer, out_dir / mode, logit_weight=logit_weight, max_steps=2,
                       per_device_train_batch_size=2, max_grad_norm=0.0)  # no clipping: compare raw gradients
        probe = GradientProbe(trainer.representation_projector)
        trainer.add_callback(probe)
        trainer.train()
        report[mode] = {
            "local_grad": probe.local.tolist(),
            "synced_grad": probe.synced.tolist(),
            "final_weights": [w.tolist() for w in projection_weights(trainer)],
        }
    (out_dir / f"rank{state.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    _distributed_run(Path(sys.argv[1]))
    end_distributed_run()
