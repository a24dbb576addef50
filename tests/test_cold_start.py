"""Off-policy cold start (methods.md §7.3): prompt split, teacher generation, answer filter, SFT config."""

import pytest
import torch
from datasets import Dataset
from tiny import tiny_model, tiny_tokenizer

from trl_opd.cold_start import (
    ColdStartArguments,
    cold_start_sft,
    filter_completions,
    generate_teacher_completions,
    repeated_ngram_share,
    sft_config,
    split_prompts,
)
from trl_opd.testbed import grade_answer

# ------------------------------------------------------------------------------------------- repetition


def test_repeated_ngram_share_counts_repeats_of_earlier_ngrams():
    # 3-grams of "a b c a b c a b c": abc bca cab abc bca cab abc -> 7, of which 3 distinct: 4/7 repeat.
    assert repeated_ngram_share("a b c a b c a b c", 3) == pytest.approx(4 / 7)
    # 2-grams of "x y x z": xy yx xz -> all distinct.
    assert repeated_ngram_share("x y x z", 2) == 0.0
    assert repeated_ngram_share("only three words", 4) == 0.0  # fewer words than n
    assert repeated_ngram_share("loop " * 50, 10) == pytest.approx(40 / 41)  # 41 identical 10-grams


# ------------------------------------------------------------------------------------------- the filter

GOOD = {"prompt": "Compute 1+2.\n", "completion": r"1+2=3. \boxed{3}", "finished": True, "answer": "3"}
TRUNCATED = {"prompt": "Compute 4+4.\n", "completion": "4+4=8. 8+", "finished": False, "answer": "8"}
TRUNCATED_AND_WRONG = {
    "prompt": "Compute 5+5.\n",
    "completion": r"\boxed{9",
    "finished": False,
    "answer": "10",
}
LOOPING = {
    "prompt": "Compute 2+2.\n",
    "completion": "2+2=4. " * 30 + r"\boxed{4}",
    "finished": True,
    "answer": "4",
}
WRONG = {"prompt": "Compute 3+3.\n", "completion": r"3+3=7. \boxed{7}", "finished": True, "answer": "6"}


def test_filter_drops_truncated_degenerate_and_wrong_answers():
    records = [GOOD, TRUNCATED, LOOPING, WRONG, TRUNCATED_AND_WRONG]
    kept, counts = filter_completions(records, grader=grade_answer, ngram_size=3)
    assert kept == [GOOD]
    # Each record counts once, for the first reason in the order truncated, degenerate, wrong.
    assert counts == {"total": 5, "truncated": 2, "degenerate": 1, "wrong": 1, "kept": 1}


def test_filter_without_grading_keeps_wrong_answers():
    kept, counts = filter_completions([GOOD, WRONG, TRUNCATED], require_correct=False, ngram_size=3)
    assert kept == [GOOD, WRONG] and counts["wrong"] == 0 and counts["truncated"] == 1


def test_filter_reads_conversational_completions():
    looping = {**LOOPING, "completion": [{"role": "assistant", "content": LOOPING["completion"]}]}
    good = {**GOOD, "completion": [{"role": "assistant", "content": GOOD["completion"]}]}
    kept, counts = filter_completions([looping, good], grader=grade_answer, ngram_size=3)
    assert kept == [good] and counts["degenerate"] == 1


def test_filter_needs_answers_to_grade():
    with pytest.raises(ValueError, match="no 'answer'"):
        filter_completions([{**GOOD, "answer": None}], grader=grade_answer)


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"ngram_size": 0}, "n-gram size"), ({"max_repeated_ngram_share": 0.0}, "share")]
)
def test_filter_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        filter_completions([GOOD], grader=grade_answer, **kwargs)


# ------------------------------------------------------------------------------------------- prompts


def test_split_prompts_deduplicates_the_opd_part():
    data = Dataset.from_dict({"prompt": ["a", "b", "a", "c", "b", "d"], "answer": ["1"] * 6})
    cold, rest = split_prompts(data, 2)
    assert cold["prompt"] == ["a", "b"] and rest["prompt"] == ["c", "d"]


@pytest.mark.parametrize("count", [0, 6])
def test_split_prompts_needs_rows_for_both_phases(count):
    with pytest.raises(ValueError, match="both phases"):
        split_prompts(Dataset.from_dict({"prompt": list("abcdef")}), count)


# ------------------------------------------------------------------------------------------- generation


class StubTeacher(torch.nn.Module):
    """A `generate` that appends fixed new tokens, to check EOS detection and decoding exactly."""

    def __init__(self, new_tokens, eos_id):
        super().__init__()
        self.new_tokens = torch.tensor(new_tokens)
        self.generation_config = type("GenerationConfig", (), {"eos_token_id": eos_id})()
        self.calls = []

    @property
    def device(self):
        return torch.device("cpu")

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append(kwargs)
        return torch.cat([input_ids, self.new_tokens[: len(input_ids)]], dim=1)


def test_generation_marks_answers_without_eos_as_unfinished():
    tokenizer = tiny_tokenizer()
    digit, eos, pad = tokenizer.convert_tokens_to_ids("1"), tokenizer.eos_token_id, tokenizer.pad_token_id
    teacher = StubTeacher([[digit, eos, pad], [digit, digit, digit], [digit, digit, eos]], eos)
    prompts = ["Compute 1+1.", "Compute 2+2.", [{"role": "user", "content": "Compute 3+3."}]]
    records = generate_teacher_completions(teacher, tokenizer, prompts, max_new_tokens=3, batch_size=3)
    assert [r["finished"] for r in records] == [True, False, True]
    assert records[0]["completion"] == "1" and records[1]["completion"] == "111"
    assert records[2]["completion"] == [{"role": "assistant", "content": "11"}]  # conversational in, out
    assert teacher.calls[0]["do_sample"] and teacher.calls[0]["top_p"] == 0.95
    assert tokenizer.padding_side == "left"


def test_generation_with_a_real_model_keeps_order_and_count():
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "right"  # restored afterwards; generation itself pads on the left
    records = generate_teacher_completions(
        tiny_model(tokenizer),
        tokenizer,
        [f"Compute {i}+1." for i in range(5)],
        max_new_tokens=4,
        batch_size=2,
        temperature=0.0,
    )
    assert [r["prompt"] for r in records] == [f"Compute {i}+1." for i in range(5)]
    assert all(isinstance(r["completion"], str) and isinstance(r["finished"], bool) for r in records)
    assert tokenizer.padding_side == "right"


# ------------------------------------------------------------------------------------------- SFT


def test_sft_config_takes_the_cold_start_schedule_and_the_opd_batch(tmp_path):
    from trl_opd import OPDConfig

    opd = OPDConfig(
        output_dir=str(tmp_path / "opd"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        seed=7,
        report_to="none",
    )
    cold = ColdStartArguments(cold_start_learning_rate=3e-4, cold_start_max_steps=12)
    config = sft_config(opd, cold, str(tmp_path / "sft"))
    assert (config.learning_rate, config.max_steps, config.lr_scheduler_type) == (3e-4, 12, "cosine")
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps, config.seed) == (8, 2, 7)
    assert config.completion_only_loss and config.output_dir == str(tmp_path / "sft")


def test_sft_with_nothing_kept_is_a_clear_error():
    with pytest.raises(ValueError, match="filtered out"):
        cold_start_sft(None, None, [], None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cold_start_num_prompts": 0}, "num_prompts"),
        ({"cold_start_top_p": 0.0}, "top_p"),
        ({"cold_start_temperature": -1.0}, "temperature"),
        ({"cold_start_max_repeated_ngram_share": 2.0}, "share"),
    ],
)
def test_bad_cold_start_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ColdStartArguments(**kwargs)
