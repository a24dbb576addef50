"""Self-distillation with privileged context (OPSD) and EDGE-OPD guided rollouts in OPDTrainer.

The teacher must see the context and the student must not; both must score the same completion tokens, each from
its own prompt; `teacher_model="self"` must stay the student's initial weights while the student trains.
"""

import copy

import numpy as np
import pytest
import torch
from datasets import Dataset

from test_opd_trainer import student, tokenizer  # noqa: F401  (module fixtures: the tiny tokenizer and student)
from tiny import cpu_args, prompt_dataset, save_tiny
from trl_opd import OPDConfig, OPDTrainer
from trl_opd.trainers import opd_trainer as opd_module
from trl_opd.trainers.rows import GUIDED_STREAM, seeded_rows
from trl_opd.trainers.self_distillation import (
    OPSD_V2,
    render_teacher_prompt,
    resolve_teacher_prompt_template,
    teacher_prompt,
)

TEMPLATE = "Reference: {solution}\n{problem}"


def solution_dataset(n=8):
    data = prompt_dataset(40).select([0, 13, 2, 38, 5, 21, 9, 30][:n])
    return data.add_column("solution", [f"[{i}] " + text for i, text in enumerate(data["completion"])])


def self_trainer(student, tokenizer, tmp_path, data=None, peft_config=None, **overrides):
    settings = dict(lmbda=0.0, max_completion_length=24, shuffle_dataset=False, teacher_prompt_template=TEMPLATE)
    settings.update(overrides)
    args = OPDConfig(output_dir=str(tmp_path / "out"), **cpu_args(**settings))
    return OPDTrainer(copy.deepcopy(student), "self", args=args, processing_class=tokenizer, peft_config=peft_config,
                      train_dataset=data if data is not None else solution_dataset())


def first_batch(trainer, rows=4):
    return trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(rows)])


def decode_rows(tokenizer, ids, mask):
    return [tokenizer.decode(row[m.bool()]) for row, m in zip(ids, mask)]


# ---------------------------------------------------------------- templates (pure)


def test_templates_substitute_in_one_pass_and_keep_other_braces():
    text = render_teacher_prompt("P={problem} S={solution} C={context} \\boxed{}", "{solution}", "x{y}")
    assert text == "P={solution} S=x{y} C=x{y} \\boxed{}"  # substituted text is not substituted again
    assert resolve_teacher_prompt_template("opsd_v2") == OPSD_V2
    assert "\\boxed{}" in resolve_teacher_prompt_template("opsd_v1")
    with pytest.raises(ValueError, match="'{problem}' placeholder"):
        resolve_teacher_prompt_template("Solve: {problem}")  # no place for the privileged context
    with pytest.raises(ValueError, match="neither a preset"):
        resolve_teacher_prompt_template("opsd_v3")


def test_conversational_teacher_prompt_replaces_the_last_user_message():
    conversation = [{"role": "system", "content": "sys"}, {"role": "user", "content": "What is 2+2?"}]
    built = teacher_prompt(conversation, "4", "{problem} (ref: {solution})")
    assert built == [{"role": "system", "content": "sys"}, {"role": "user", "content": "What is 2+2? (ref: 4)"}]
    assert conversation[1]["content"] == "What is 2+2?"  # the student's prompt is untouched
    assert teacher_prompt("Q", "A", "{problem}|{context}", problem="P") == "P|A"


# ---------------------------------------------------------------- the teacher's prompt and alignment


def test_teacher_sees_the_context_and_the_student_does_not(student, tokenizer, tmp_path):
    trainer = self_trainer(student, tokenizer, tmp_path)
    batch = first_batch(trainer)
    rows = [trainer.train_dataset[i] for i in range(4)]
    teacher_texts = decode_rows(tokenizer, batch["teacher_prompt_ids"], batch["teacher_prompt_mask"])
    student_texts = decode_rows(tokenizer, batch["prompt_ids"], batch["prompt_mask"])
    for row, teacher_text, student_text in zip(rows, teacher_texts, student_texts):
        assert teacher_text == f"Reference: {row['solution']}\n{row['prompt']}"
        assert student_text == row["prompt"]
        assert row["solution"][:4] not in student_text  # "[i] " marks the context


def completion_logits(model, prompt, completion):
    """Unpadded forward of [prompt ‖ completion]; logits predicting the completion tokens."""
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt, completion]).unsqueeze(0)).logits[0]
    return logits[len(prompt) - 1: len(prompt) - 1 + len(completion)]


@pytest.mark.parametrize("explicit_position_ids", [True, False])
def test_both_sides_score_the_same_completion_tokens_from_their_own_prompt(student, tokenizer, tmp_path,
                                                                            explicit_position_ids):
    trainer = self_trainer(student, tokenizer, tmp_path, explicit_position_ids=explicit_position_ids)
    trainer.model.eval()
    batch = first_batch(trainer)
    width = batch["completion_ids"].shape[1]
    head = trainer.model.lm_head
    with torch.no_grad():
        student_logits = head(trainer._hidden_states(trainer.model, *trainer._student_sequence(batch), width))
        teacher_logits = head(trainer._teacher_hidden_state(batch, width))
    for row in range(batch["completion_ids"].shape[0]):
        completion = batch["completion_ids"][row][batch["completion_mask"][row].bool()]
        student_prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()]
        teacher_prompt_ids = batch["teacher_prompt_ids"][row][batch["teacher_prompt_mask"][row].bool()]
        n = len(completion)
        # Padding never reaches the prompt of an unpadded forward: the comparison checks slicing and positions.
        torch.testing.assert_close(student_logits[row, :n],
                                   completion_logits(trainer.model, student_prompt, completion), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(teacher_logits[row, :n],
                                   completion_logits(trainer.teacher_model, teacher_prompt_ids, completion),
                                   rtol=1e-4, atol=1e-5)
    assert batch["teacher_prompt_ids"].shape[1] > batch["prompt_ids"].shape[1]


def test_per_role_chat_template_kwargs(student, tokenizer, tmp_path):
    flagged = copy.deepcopy(tokenizer)
    flagged.chat_template = (
        "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if think %}THINK\n{% endif %}"
    )
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Compute {i}+1."}] for i in range(4)],
                              "solution": [f"{i + 1}" for i in range(4)]})
    trainer = self_trainer(student, flagged, tmp_path, data=data, lmbda=1.0, max_completion_length=3,
                           teacher_prompt_template="{problem} ref {solution}",
                           student_chat_template_kwargs={"think": False},
                           teacher_chat_template_kwargs={"think": True})
    batch = first_batch(trainer)
    student_texts = decode_rows(flagged, batch["prompt_ids"], batch["prompt_mask"])
    teacher_texts = decode_rows(flagged, batch["teacher_prompt_ids"], batch["teacher_prompt_mask"])
    assert student_texts[0] == "Compute 0+1.\n"
    assert teacher_texts[0] == "Compute 0+1. ref 1\nTHINK\n"


# ---------------------------------------------------------------- the self-teacher stays the initial policy


def test_self_teacher_is_a_frozen_copy_of_the_initial_student(student, tokenizer, tmp_path):
    trainer = self_trainer(student, tokenizer, tmp_path, max_steps=2)
    assert trainer.teacher_model is not trainer.model
    trainer.train()
    for initial, student_p, teacher_p in zip(student.parameters(), trainer.model.parameters(),
                                             trainer.teacher_model.parameters()):
        assert torch.equal(initial, teacher_p)
        assert not teacher_p.requires_grad
    assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), trainer.model.parameters()))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[0] > 0  # the context makes the initial teacher differ from the initial student


def test_lora_self_teacher_is_the_base_model_with_the_adapter_disabled(student, tokenizer, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                      init_lora_weights=False)  # a non-zero adapter from the start: enabled ≠ disabled
    trainer = self_trainer(student, tokenizer, tmp_path, peft_config=lora, max_steps=1)
    assert trainer.teacher_model is None
    trainer.train()
    trainer.model.eval()
    batch = first_batch(trainer)
    width = batch["completion_ids"].shape[1]
    with torch.no_grad():
        teacher_hidden = trainer._teacher_hidden_state(batch, width)
        reference = copy.deepcopy(student).eval()
        expected = trainer._hidden_states(reference, *trainer._teacher_sequence(batch), width)
        with_adapter = trainer._hidden_states(trainer.model, *trainer._teacher_sequence(batch), width)
    torch.testing.assert_close(teacher_hidden, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(with_adapter, expected, atol=1e-4)
    assert trainer.model.training is False  # the teacher's forward restored the mode it found


# ---------------------------------------------------------------- EDGE-OPD guided rollouts


def test_guided_rows_generate_from_the_privileged_prompt_but_train_on_the_plain_one(student, tokenizer, tmp_path,
                                                                                    monkeypatch):
    trainer = self_trainer(student, tokenizer, tmp_path, lmbda=1.0, guided_fraction=0.5, max_completion_length=4)
    seen = []
    parent = opd_module.DistillationTrainer._generate_single_turn

    def spy(self, prompt_ids, *args, **kwargs):
        seen.append([list(ids) for ids in prompt_ids])
        return parent(self, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(opd_module.DistillationTrainer, "_generate_single_turn", spy)
    trainer.state.global_step = 3
    batch = first_batch(trainer, rows=8)
    expected = seeded_rows(0.5, seed=0, step=3, first_row=0, num_rows=8, stream=GUIDED_STREAM)
    assert batch["is_guided"].tolist() == expected and 0 < sum(expected) < 8
    teacher_ids = [row[m.bool()].tolist() for row, m in zip(batch["teacher_prompt_ids"], batch["teacher_prompt_mask"])]
    student_ids = [row[m.bool()].tolist() for row, m in zip(batch["prompt_ids"], batch["prompt_mask"])]
    assert seen[0] == [t if g else s for t, s, g in zip(teacher_ids, student_ids, expected)]
    assert trainer._metrics["train"]["rollout/guided_share"][-1] == pytest.approx(sum(expected) / 8)


def test_edge_opd_trains_with_guided_rollouts_and_the_evidence_mask(student, tokenizer, tmp_path):
    trainer = self_trainer(student, tokenizer, tmp_path, lmbda=1.0, guided_fraction=0.5, evidence_mode="quantile",
                           evidence_quantile=0.5, loss_reduction="weighted_mean", max_steps=2,
                           max_completion_length=6)
    trainer.train()
    log = trainer.state.log_history[0]
    assert all(np.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)
    assert 0.4 <= log["evidence/kept_share"] <= 0.7
    assert "rollout/guided_share" in log and "evidence/kept_share_guided" in log


# ---------------------------------------------------------------- errors before any model is loaded


def test_self_teacher_without_the_context_column_fails_before_loading(tokenizer, tmp_path, no_model_loading):
    path = save_tiny(tmp_path / "student", tokenizer)
    args = OPDConfig(output_dir=str(tmp_path / "o"), **cpu_args())
    with pytest.raises(ValueError, match="reads the column 'solution'.*teacher_context_column"):
        OPDTrainer(path, "self", args=args, train_dataset=prompt_dataset())
    args = OPDConfig(output_dir=str(tmp_path / "o"), teacher_model_name_or_path="self",
                     teacher_problem_column="question", **cpu_args())
    with pytest.raises(ValueError, match="'question'"):
        OPDTrainer(path, args=args, train_dataset=solution_dataset())


def test_guided_rollouts_need_a_privileged_prompt(tokenizer, tmp_path, no_model_loading):
    path = save_tiny(tmp_path / "student", tokenizer)
    args = OPDConfig(output_dir=str(tmp_path / "o"), guided_fraction=0.25, **cpu_args())
    with pytest.raises(ValueError, match="guided_fraction=0.25.*teacher gets none"):
        OPDTrainer(path, path, args=args, train_dataset=solution_dataset())
    with pytest.raises(ValueError, match="use_teacher_context=False"):
        OPDConfig(output_dir=str(tmp_path / "o"), guided_fraction=0.25, use_teacher_context=False, **cpu_args())
