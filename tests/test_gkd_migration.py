"""GKD migration (issue 18, item 3): OPDTrainer trains on GKDTrainer's `messages` datasets, and with GKD's fields
(`trl_opd.trainers.gkd_migration.gkd_arguments`) its losses equal GKDTrainer's step by step where the methods
coincide: off-policy (`lmbda=0`), full-vocabulary generalized JSD."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from tests.tiny import cpu_args, tiny_model, tiny_tokenizer
from trl_opd import OPDConfig, OPDTrainer
from trl_opd.trainers.gkd_migration import gkd_arguments, messages_to_prompt_completion

# ChatML without the newline after <|im_end|>: the assistant turn ends at the EOS token, as OPDTrainer's off-policy
# completions do (GKD would also train on the newline the usual ChatML template writes after it; README).
CHATML_EOS_LAST = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def conversations(n: int = 6) -> Dataset:
    rows = []
    for i in range(n):
        turn = [{"role": "user", "content": f"Compute {i}+{i + 1}."},
                {"role": "assistant", "content": f"{i}+{i + 1}={2 * i + 1}. \\boxed{{{2 * i + 1}}}"}]
        if i % 2:  # some multi-turn rows: the prompt is everything before the last assistant turn
            turn = [{"role": "user", "content": "Compute 1+1."}, {"role": "assistant", "content": "1+1=2."}] + turn
        rows.append(turn)
    return Dataset.from_dict({"messages": rows})


def test_messages_are_split_at_the_last_assistant_turn():
    data = messages_to_prompt_completion(conversations(2))
    assert data.column_names == ["prompt", "completion"]
    assert data[1]["prompt"][-1] == {"role": "user", "content": "Compute 1+2."}
    assert len(data[1]["prompt"]) == 3
    assert data[1]["completion"] == [{"role": "assistant", "content": "1+2=3. \\boxed{3}"}]


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Compute 1+1."}],  # no assistant turn
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    [{"role": "assistant", "content": "b"}],  # nothing before the assistant turn
])
def test_malformed_conversation_fails_with_its_row(messages):
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match="Row 1 of `train_dataset`.*final 'assistant' message"):
        messages_to_prompt_completion(Dataset.from_dict({"messages": [good, messages]}))


def test_prompt_column_wins_over_messages():
    data = Dataset.from_dict({"prompt": ["p"], "completion": ["c"],
                              "messages": [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]})
    assert messages_to_prompt_completion(data) is data


def test_gkd_arguments_keep_gkd_meaning():
    assert gkd_arguments(beta=0.0)["divergence"] == "forward_kl"
    assert gkd_arguments(beta=1.0)["divergence"] == "reverse_kl"
    kwargs = gkd_arguments()  # GKD's defaults
    assert kwargs["divergence"] == "jsd" and kwargs["beta"] == 0.5 and kwargs["lmbda"] == 0.5
    assert kwargs["temperature"] == 0.9 and kwargs["distillation_temperature"] == 1.0
    assert kwargs["max_completion_length"] == 128 and kwargs["disable_dropout"] is True
    config = OPDConfig(output_dir="/tmp/gkd-args", **{**cpu_args(), **kwargs})
    assert config.effective_distillation_temperature == 1.0


SHARED = {  # every optimizer setting spelled out: GKDConfig and OPDConfig have different defaults
    "learning_rate": 1e-2, "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0,
    "max_grad_norm": 1.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8,
    "gradient_accumulation_steps": 1,
}


def _losses(trainer) -> list[float]:
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_opd_losses_equal_gkd_losses_step_by_step(tmp_path):
    """Same tiny student and teacher, same 6 conversations in one batch per step (so the sampler's order cannot
    matter), lmbda=0, GKD beta=0.5 (generalized JSD over the full vocabulary), 4 optimizer steps."""
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHATML_EOS_LAST
    data = conversations(6)
    common = {**cpu_args(max_steps=4, per_device_train_batch_size=6), **SHARED}
    common.pop("max_completion_length")
    gkd = GKDTrainer(
        model=tiny_model(tokenizer, seed=1),
        teacher_model=tiny_model(tokenizer, hidden=48, seed=2),
        args=GKDConfig(output_dir=str(tmp_path / "gkd"), lmbda=0.0, beta=0.5, temperature=1.0, max_new_tokens=32,
                       **common),
        train_dataset=data,
        processing_class=tokenizer,
    )
    opd = OPDTrainer(
        model=tiny_model(tokenizer, seed=1),
        teacher_model=tiny_model(tokenizer, hidden=48, seed=2),
        args=OPDConfig(output_dir=str(tmp_path / "opd"),
                       **gkd_arguments(lmbda=0.0, beta=0.5, temperature=1.0, max_new_tokens=32), **common),
        train_dataset=data,
        processing_class=tokenizer,
    )
    gkd_losses, opd_losses = _losses(gkd), _losses(opd)
    assert len(gkd_losses) == len(opd_losses) == 4
    # The forwards differ only in padding layout (GKD left-pads whole sequences, OPDTrainer left-pads the prompt and
    # right-pads the completion) and in the chunked loss: float32 rounding, far below the steps' changes.
    torch.testing.assert_close(torch.tensor(opd_losses), torch.tensor(gkd_losses), rtol=1e-4, atol=1e-6)
    assert abs(gkd_losses[-1] - gkd_losses[0]) > 0.1 * gkd_losses[0]  # it covers training, not only step 1
