"""Teacher-aligned prompts (methods.md §7.3): the template, the dataset mix, and OPDTrainer's use of them (the per-row
draw itself: test_rows.py)."""

import copy

import numpy as np
import pytest
from datasets import Dataset

from test_opd_trainer import student, teacher, tokenizer  # noqa: F401  (module fixtures: tiny tokenizer and models)
from test_tip import make_trainer
from tiny import cpu_args
from trl_opd import OPDConfig, OPDTrainer
from trl_opd.trainers.aligned_prompts import (
    BOXED,
    aligned_prompt,
    mix_prompt_datasets,
    resolve_aligned_prompt_template,
)
from trl_opd.trainers.rows import ALIGNED_STREAM, seeded_rows

SUFFIX = " Please reason step by step, and put your final answer within \\boxed{}."


def test_template_formats_strings_and_the_last_user_message():
    template = resolve_aligned_prompt_template("boxed")
    assert template == BOXED == "{problem}" + SUFFIX
    assert aligned_prompt("Compute 2+3.", template) == "Compute 2+3." + SUFFIX
    # One pass: braces in the problem are not placeholders, and literal braces of the template stay.
    assert aligned_prompt("Is {problem} a set?", "Q: {problem} {x}") == "Q: Is {problem} a set? {x}"
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 2+3."},
                    {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4+4?"}]
    formatted = aligned_prompt(conversation, template)
    assert formatted[:3] == conversation[:3] and formatted[3] == {"role": "user", "content": "And 4+4?" + SUFFIX}
    assert conversation[3]["content"] == "And 4+4?"  # the row's prompt is not modified in place


def test_mix_prompt_datasets_is_seeded_and_checks_the_ratio():
    aligned = Dataset.from_dict({"prompt": [f"a{i}" for i in range(200)]})
    other = Dataset.from_dict({"prompt": [f"o{i}" for i in range(200)]})
    mixed = mix_prompt_datasets(aligned, other, 0.25, seed=3)
    assert mixed["prompt"] == mix_prompt_datasets(aligned, other, 0.25, seed=3)["prompt"]
    share = np.mean([prompt.startswith("a") for prompt in mixed["prompt"]])
    assert share == pytest.approx(0.25, abs=0.06)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\)"):
        mix_prompt_datasets(aligned, other, 1.0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"aligned_prompt_ratio": 1.5}, r"`aligned_prompt_ratio` must be in \[0, 1\]"),
        ({"aligned_prompt_ratio": -0.1}, r"`aligned_prompt_ratio` must be in \[0, 1\]"),
        ({"aligned_prompt_template": "Solve it step by step."}, r"'\{problem\}' placeholder"),
        ({"aligned_prompt_template": "boxedd"}, "neither a preset"),
    ],
)
def test_config_rejects_bad_aligned_prompt_settings(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        OPDConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **overrides)


def decoded_prompts(trainer, batch):
    return [trainer.processing_class.decode(ids[mask.bool()]) for ids, mask in
            zip(batch["prompt_ids"], batch["prompt_mask"])]


def test_trainer_formats_the_drawn_training_rows_for_student_and_teacher(student, teacher, tokenizer, tmp_path):
    trainer = make_trainer(student, teacher, tokenizer, tmp_path, aligned_prompt_template="boxed",
                           aligned_prompt_ratio=0.5, seed=1)
    rows = [trainer.train_dataset[i] for i in range(8)]
    trainer.state.global_step = 4
    trainer.model.train()
    batch = trainer._generate_and_score_completions(rows)
    chosen = seeded_rows(0.5, seed=1, step=4, first_row=0, num_rows=8, stream=ALIGNED_STREAM)
    assert 0 < sum(chosen) < 8
    for row, prompt, is_aligned in zip(rows, decoded_prompts(trainer, batch), chosen):
        assert prompt == (row["prompt"] + SUFFIX if is_aligned else row["prompt"])
    assert trainer._metrics["train"]["rollout/aligned_share"] == [sum(chosen) / 8]
    assert rows[0]["prompt"] == trainer.train_dataset[0]["prompt"]  # dataset rows untouched
    assert "teacher_prompt_ids" not in batch  # the teacher scores after the same (formatted) prompt ids

    trainer.model.eval()  # evaluation prompts are never changed
    batch = trainer._generate_and_score_completions(rows)
    assert decoded_prompts(trainer, batch) == [row["prompt"] for row in rows]


def test_self_distillation_teacher_prompt_wraps_the_aligned_prompt(student, teacher, tokenizer, tmp_path):
    rows = [{"prompt": "Compute 1+2.", "completion": " 3", "solution": "1+2=3"}]
    args = OPDConfig(output_dir=str(tmp_path), aligned_prompt_template="Q: {problem}", aligned_prompt_ratio=1.0,
                     use_teacher_context=True, teacher_prompt_template="{problem} | {solution}", lmbda=0.0,
                     **cpu_args())
    trainer = OPDTrainer(copy.deepcopy(student), copy.deepcopy(teacher), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.model.train()
    batch = trainer._generate_and_score_completions(rows)
    assert decoded_prompts(trainer, batch) == ["Q: Compute 1+2."]
    teacher = trainer.processing_class.decode(batch["teacher_prompt_ids"][0][batch["teacher_prompt_mask"][0].bool()])
    assert teacher == "Q: Compute 1+2. | 1+2=3"
