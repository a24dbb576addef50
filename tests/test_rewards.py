r"""Math accuracy and format rewards: grading semantics, TRL's reward signature, use inside trl.GRPOTrainer."""

from __future__ import annotations

import pytest
from trl import GRPOConfig, GRPOTrainer

from tiny import cpu_args, tiny_model
from trl_opd.rewards import boxed_format_reward, is_well_formatted, math_accuracy_reward


def test_accuracy_reward_grades_the_final_boxed_answer():
    completions = [
        "3+4=7. \\boxed{7}",                      # right
        "3+4=8. \\boxed{8}",                      # wrong
        "the answer is 7",                        # right number, but never committed to a box
        "<think>maybe \\boxed{8}</think> so \\boxed{7}",  # only the box after the thinking counts
        "<think>\\boxed{7}</think> so \\boxed{8}",
        "\\boxed{ 007 }",                         # same number, written differently (fast path)
    ]
    rewards = math_accuracy_reward(["p"] * 6, completions, answer=["7"] * 6, completion_ids=[[0]] * 6,
                                   trainer_state=None, log_extra=None, log_metric=None)
    assert rewards == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]


def test_accuracy_reward_uses_math_verify_for_equivalent_forms():
    completions = ["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{\\frac{1}{3}}"]
    assert math_accuracy_reward(None, completions, answer=["1/2", "\\frac{1}{2}", "0.5"]) == [1.0, 1.0, 0.0]


def test_accuracy_reward_columns_and_conversational_completions():
    conversational = [[{"role": "assistant", "content": f"\\boxed{{{n}}}"}] for n in (12, 1)]
    assert math_accuracy_reward(None, conversational, solution=["12", "2"]) == [1.0, 0.0]
    # `answer` wins over `solution` (the testbed's `solution` is a worked solution, not the final answer)
    assert math_accuracy_reward(None, ["\\boxed{5}"], answer=["5"], solution=["2+3=5. \\boxed{5}"]) == [1.0]
    assert math_accuracy_reward(None, ["\\boxed{5}", "\\boxed{5}"], answer=[None, 5]) == [None, 1.0]


def test_accuracy_reward_errors_say_what_to_add():
    with pytest.raises(ValueError, match="add an 'answer' column"):
        math_accuracy_reward(["p"], ["\\boxed{1}"], problem=["1"])
    with pytest.raises(ValueError, match="one gold answer per completion"):
        math_accuracy_reward(["p", "q"], ["\\boxed{1}", "\\boxed{2}"], answer=["1"])
    with pytest.raises(ValueError, match="one gold answer per completion"):
        math_accuracy_reward(["p"], ["\\boxed{1}"], answer="1")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2+2=4. \\boxed{4}", True),
        ("<think>2+2 is 4</think>\n\\boxed{4}", True),
        ("reasoning opened by the chat template</think> \\boxed{4}", True),
        ("<think>2+2 is 4 \\boxed{4}", False),          # thinking never closed (truncated)
        ("<think>a</think> <think>b \\boxed{4}", False),  # the last thinking block is open
        ("2+2=4.", False),
        ("\\boxed{ }", False),
        ("\\boxed{4", False),
    ],
)
def test_format(text, expected):
    assert is_well_formatted(text) is expected
    assert boxed_format_reward(["p"], [text]) == [1.0 if expected else 0.0]
    assert boxed_format_reward(["p"], [[{"role": "assistant", "content": text}]]) == [1.0 if expected else 0.0]


def test_rewards_plug_into_trl_grpo(tmp_path):
    """Testbed rows (prompt + answer column) through trl.GRPOTrainer: the rewards get the column and are logged."""
    from trl_opd.testbed import TaskConfig, char_tokenizer, make_dataset

    tokenizer = char_tokenizer()
    calls = []

    def recording_accuracy(prompts, completions, **kwargs):
        rewards = math_accuracy_reward(prompts, completions, **kwargs)
        calls.append((kwargs["answer"], completions, rewards))
        return rewards

    trainer = GRPOTrainer(
        tiny_model(tokenizer), [recording_accuracy, boxed_format_reward],
        args=GRPOConfig(output_dir=str(tmp_path), reward_weights=[1.0, 0.1],
                        **cpu_args(max_steps=1, num_generations=4, max_completion_length=8)),
        train_dataset=make_dataset(8, TaskConfig(), seed=0), processing_class=tokenizer,
    )
    trainer.train()
    (answers, completions, rewards), = calls
    assert len(answers) == len(completions) == 4 and all(isinstance(a, str) for a in answers)
    assert rewards == [1.0 if f"\\boxed{{{a}}}" in c else 0.0 for a, c in zip(answers, completions)]
    logged = trainer.state.log_history[0]
    assert "rewards/recording_accuracy/mean" in logged and "rewards/boxed_format_reward/mean" in logged
