"""A served teacher (issue 15): the served signal in the objective's kernels against brute force, refusals of what a
backend cannot serve, trl_opd's server giving exactly the local teacher's steps (full vocabulary, student top-k,
temperature, TIP, diagnostics, OPRD, RLAD), and faults: a server down at start, killed and restarted mid-run, or gone
for longer than the retry window (the run stops before the step's update and resumes with the same losses).

The vLLM backend against a real vLLM server: tests/test_vllm_teacher.py. The server's protocol:
tests/test_teacher_server.py.
"""

from __future__ import annotations

import copy
import os
import signal
import threading
import time

import pytest
import torch
from transformers import TrainerCallback

from servers import free_port, start_trl_opd_server, stop
from tiny import cpu_args, prompt_dataset, save_tiny, tiny_model, tiny_tokenizer
from trl_opd import OPDConfig, OPDTrainer, RLADConfig, RLADTrainer
from trl_opd.losses import SparseTeacherLogits, chunked_token_divergence, fused_divergence_loss, per_token_divergence
from trl_opd.objective import ServedTeacher
from trl_opd.serving.http import TeacherServerError

# ---------------------------------------------------------------- the served signal in the kernels (float64)


def served_support(teacher_logits: torch.Tensor, ids: torch.Tensor) -> SparseTeacherLogits:
    """What a server returns: the teacher's log-probs at `ids`, nothing else."""
    return SparseTeacherLogits(ids, teacher_logits.log_softmax(-1).gather(-1, ids), teacher_logits.shape[-1])


@pytest.fixture
def heads():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 6, dtype=torch.float64, generator=generator)
    weight = torch.randn(17, 6, dtype=torch.float64, generator=generator)
    teacher_logits = 2 * torch.randn(9, 17, dtype=torch.float64, generator=generator)
    return hidden, weight, teacher_logits


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd", "tvd", "skew_reverse_kl"])
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("source, served_k, loss_k", [("teacher", 6, 6), ("teacher", 6, 3), ("student", 5, 5),
                                                      ("union", 4, 4)])
def test_served_support_gives_the_local_divergence_and_gradient(heads, divergence, tail, source, served_k, loss_k):
    """The served log-probs (teacher top-k, or the teacher at the student's top-k / the union) in the kernels equal
    the divergence from the full teacher logits on the same support, values and gradients, for every divergence."""
    hidden, weight, teacher_logits = heads
    student_logits = hidden @ weight.t()
    if source == "teacher":
        ids = teacher_logits.topk(served_k).indices
    elif source == "student":
        ids = student_logits.topk(served_k).indices
    else:  # the union, padded with −1 where both sides chose the same id
        both = torch.cat([student_logits.topk(served_k).indices, teacher_logits.topk(served_k).indices], -1)
        ids = torch.stack([torch.cat([row.unique(), row.new_full((2 * served_k - len(row.unique()),), -1)])
                           for row in both])
    served = served_support(teacher_logits, ids.clamp(min=0))
    served = SparseTeacherLogits(ids, served.logprobs.masked_fill(ids < 0, 0.0), served.vocab_size)
    options = {"divergence": divergence, "top_k": loss_k, "top_k_source": source, "top_k_tail": tail}

    leaf = hidden.clone().requires_grad_(True)
    expected = per_token_divergence(leaf @ weight.t(), teacher_logits, **options)
    expected.sum().backward()
    got_leaf = hidden.clone().requires_grad_(True)
    got = chunked_token_divergence(got_leaf, weight, served.row_indices(), served, chunk_size=4, **options)
    got.sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_leaf.grad, leaf.grad, rtol=1e-10, atol=1e-12)

    fused_leaf = hidden.clone().requires_grad_(True)
    coefficients = torch.linspace(0.0, 1.0, len(hidden), dtype=torch.float64)
    loss, per_token, _ = fused_divergence_loss(fused_leaf, weight, served.row_indices(), served, coefficients,
                                               chunk_size=4, **options)
    loss.backward()
    reference_leaf = hidden.clone().requires_grad_(True)
    (coefficients * per_token_divergence(reference_leaf @ weight.t(), teacher_logits, **options)).sum().backward()
    torch.testing.assert_close(per_token, expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused_leaf.grad, reference_leaf.grad, rtol=1e-10, atol=1e-12)


def test_served_logits_give_back_the_log_probs_and_the_leftover_mass(heads):
    _, _, teacher_logits = heads
    ids = teacher_logits.topk(5).indices
    served = served_support(teacher_logits, ids)
    log_probs = served.logits(served.row_indices()).log_softmax(-1)
    torch.testing.assert_close(log_probs.gather(-1, ids), teacher_logits.log_softmax(-1).gather(-1, ids))
    leftover = 1 - teacher_logits.softmax(-1).gather(-1, ids).sum(-1)
    torch.testing.assert_close(log_probs.exp().sum(-1) - log_probs.gather(-1, ids).exp().sum(-1), leftover)


def test_a_served_teacher_refuses_another_temperature_and_other_tokens():
    served = ServedTeacher(torch.tensor([[3, 4]]), vocab_size=8, temperature=1.0,
                           sampled_logprobs=torch.tensor([[-1.0, -2.0]]))
    rows = served.rows(torch.tensor([[True, True]]))
    assert rows.token_logprobs(torch.tensor([3, 4]), temperature=1.0, chunk_size=8).tolist() == [-1.0, -2.0]
    with pytest.raises(ValueError, match="temperature 1.0, but the loss asks for T_d = 0.5"):
        rows.token_logprobs(torch.tensor([3, 4]), temperature=0.5, chunk_size=8)
    with pytest.raises(ValueError, match="misalignment"):
        rows.token_logprobs(torch.tensor([3, 5]), temperature=1.0, chunk_size=8)
    with pytest.raises(ValueError, match="only the sampled tokens' log-probs"):
        _ = rows.head


# ---------------------------------------------------------------- what each backend can serve, refused at construction

URL = "http://127.0.0.1:9"


@pytest.mark.parametrize("settings, words", [
    ({}, "full-vocabulary divergence .* vLLM server .* cannot return; trl_opd's teacher server"),
    ({"loss_top_k": 4}, "loss_top_k_source='student' needs the teacher's whole next-token distribution"),
    ({"loss_top_k": 4, "loss_top_k_source": "union"}, "loss_top_k_source='union'"),
    ({"estimator": "k3", "diagnostics_steps": 1}, "diagnostics"),
    ({"estimator": "k3", "token_selection": "tip_soft_or"}, "token_selection='tip_soft_or'"),
    ({"estimator": "k3", "representation_weight": 0.1}, "OPRD .* hidden states at chosen layers"),
    ({"estimator": "k3", "temperature": 0.7}, "temperature 1.0, but this config reads the teacher at 0.7"),
    ({"loss_top_k": 30, "loss_top_k_source": "teacher"}, "loss_top_k=30 exceeds teacher_server_top_k=20"),
    ({"estimator": "k3", "lmbda": 0.5, "seq_kd": True}, "seq_kd=True needs the teacher to generate"),
    ({"estimator": "k3", "teacher_model_name_or_path": "some/teacher"}, "either loaded here or served"),
])
def test_vllm_backend_refuses_what_it_cannot_serve(settings, words, tmp_path):
    with pytest.raises(ValueError, match=words):
        OPDConfig(output_dir=str(tmp_path), teacher_model_server_url=URL, **{**cpu_args(), **settings})


@pytest.mark.parametrize("settings", [
    {"estimator": "k3"}, {"estimator": "sampled_pg", "evidence_mode": "quantile"},
    {"loss_top_k": 20, "loss_top_k_source": "teacher", "loss_top_k_tail": True, "token_selection": "tip_soft_or",
     "position_weighting": "increasing"},
])
def test_vllm_backend_accepts_what_it_serves(settings, tmp_path):
    OPDConfig(output_dir=str(tmp_path), teacher_model_server_url=URL, **{**cpu_args(), **settings})


def test_trl_opd_backend_serves_every_method_but_teacher_generation(tmp_path):
    for settings in ({}, {"loss_top_k": 4, "loss_top_k_source": "union"}, {"diagnostics_steps": 1},
                     {"representation_weight": 0.1}, {"distillation_temperature": 2.0}):
        OPDConfig(output_dir=str(tmp_path), teacher_model_server_url=URL, teacher_server_backend="trl_opd",
                  **{**cpu_args(), **settings})
    with pytest.raises(ValueError, match="no served teacher can: load the teacher locally"):
        OPDConfig(output_dir=str(tmp_path), teacher_model_server_url=URL, teacher_server_backend="trl_opd",
                  lmbda=0.5, seq_kd=True, **cpu_args())


def test_bad_values_are_refused(tmp_path):
    with pytest.raises(ValueError, match="http"):
        OPDConfig(output_dir=str(tmp_path), teacher_model_server_url="localhost:8000", estimator="k3", **cpu_args())
    with pytest.raises(ValueError, match="teacher_server_backend"):
        OPDConfig(output_dir=str(tmp_path), teacher_model_server_url=URL, teacher_server_backend="sglang",
                  **cpu_args())
    with pytest.raises(ValueError, match="temperature 1.0"):
        RLADConfig(output_dir=str(tmp_path), teacher_model_server_url=URL, num_generations=4,
                   **cpu_args(temperature=0.7))


@pytest.mark.parametrize("backend", ["vllm", "trl_opd"])
def test_a_server_down_at_start_fails_before_loading_with_its_url(backend, tmp_path, no_model_loading):
    url = f"http://127.0.0.1:{free_port()}"
    args = OPDConfig(output_dir=str(tmp_path), teacher_model_server_url=url, teacher_server_backend=backend,
                     estimator="k3", **cpu_args())
    started = time.monotonic()
    with pytest.raises(TeacherServerError, match=url.replace(".", r"\.")):
        OPDTrainer("unused/student/path", args=args, train_dataset=prompt_dataset(8),
                   processing_class=tiny_tokenizer())
    assert time.monotonic() - started < 10


# ---------------------------------------------------------------- trl_opd's server: the local teacher's steps exactly


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def student(tokenizer):
    return tiny_model(tokenizer, hidden=32, seed=0)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("teacher")
    save_tiny(directory, tokenizer, hidden=48, seed=1)
    return directory


@pytest.fixture(scope="module")
def server(teacher_dir):
    url, process = start_trl_opd_server(str(teacher_dir), teacher_dir / "server.log")
    yield url
    stop(process)


def served_args(url: str) -> dict:
    return {"teacher_model_server_url": url, "teacher_server_backend": "trl_opd"}


def logged_steps(trainer) -> list[dict]:
    volatile = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")
    return [{key: value for key, value in entry.items() if key not in volatile}
            for entry in trainer.state.log_history if "loss" in entry]


def opd_run(student, tokenizer, teacher: dict, output_dir, rows: int = 8, **settings):
    args = OPDConfig(output_dir=str(output_dir), **{**cpu_args(max_steps=2), **teacher, **settings})
    trainer = OPDTrainer(copy.deepcopy(student), args=args, train_dataset=prompt_dataset(rows),
                         processing_class=tokenizer)
    trainer.train()
    return trainer


TRL_OPD_METHODS = {
    "full_vocabulary_reverse_kl": {},
    "student_top_k_tail": {"loss_top_k": 4, "loss_top_k_tail": True},
    "union_top_k": {"loss_top_k": 4, "loss_top_k_source": "union"},
    "temperature_tip_diagnostics": {"distillation_temperature": 2.0, "token_selection": "tip_soft_or",
                                    "diagnostics_steps": 1},
    "oprd_linear_projector": {"representation_weight": 0.1},
    "oprd_only": {"representation_weight": 1.0, "logit_weight": 0.0},
    "oprd_bridge": {"representation_weight": 0.1, "projector": "bridge", "bridge_fit_prompts": 4},
}


@pytest.mark.parametrize("method", list(TRL_OPD_METHODS))
def test_trl_opd_server_gives_the_local_teachers_steps(server, teacher_dir, student, tokenizer, tmp_path, method):
    """Same hidden states (bit for bit on this CPU), same head: every logged number of every step is equal."""
    settings = TRL_OPD_METHODS[method]
    local = opd_run(student, tokenizer, {"teacher_model_name_or_path": str(teacher_dir)}, tmp_path / "l", **settings)
    served = opd_run(student, tokenizer, served_args(server), tmp_path / "s", **settings)
    local_steps, served_steps = logged_steps(local), logged_steps(served)
    assert len(local_steps) == 2
    for expected, got in zip(local_steps, served_steps):
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key


def char_variety_reward(prompts, completions, **kwargs):
    return [float(len(set(text))) for text in completions]


def test_rlad_with_trl_opd_server_at_any_temperature(server, teacher_dir, student, tokenizer, tmp_path):
    def run(teacher: dict, name: str):
        args = RLADConfig(output_dir=str(tmp_path / name), **teacher,
                          **cpu_args(max_steps=2, num_generations=4, temperature=0.7))
        trainer = RLADTrainer(copy.deepcopy(student), char_variety_reward, args=args,
                              train_dataset=prompt_dataset(8), processing_class=tokenizer)
        trainer.train()
        return logged_steps(trainer)

    local, served = run({"teacher_model_name_or_path": str(teacher_dir)}, "l"), run(served_args(server), "s")
    for expected, got in zip(local, served):
        for key in ("loss", "rlad/teacher_log_ratio", "rlad/teacher_clamp_share"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key


# ---------------------------------------------------------------- faults mid-run


class KillServerAfterStep(TrainerCallback):
    """Kills the server process (SIGKILL, its whole group) once `step` optimizer steps are done; optionally restarts
    it on the same port after `restart_after` seconds, from another thread (while the trainer retries)."""

    def __init__(self, process_box: dict, step: int, restart_after: float | None = None, restart=None):
        self.box, self.step, self.restart_after, self.restart = process_box, step, restart_after, restart

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.step:
            return
        os.killpg(self.box["process"].pid, signal.SIGKILL)
        self.box["process"].wait()
        if self.restart_after is not None:
            def restart():
                time.sleep(self.restart_after)
                self.box["process"] = self.restart()

            threading.Thread(target=restart, daemon=True).start()


def test_a_server_killed_mid_run_and_restarted_is_retried_and_the_run_goes_on(teacher_dir, student, tokenizer,
                                                                              tmp_path):
    port = free_port()
    url, process = start_trl_opd_server(str(teacher_dir), tmp_path / "first.log", port=port)
    box = {"process": process}

    def restart():
        return start_trl_opd_server(str(teacher_dir), tmp_path / "second.log", port=port)[1]

    try:
        args = OPDConfig(output_dir=str(tmp_path / "run"), **served_args(url), **cpu_args(max_steps=3),
                         teacher_server_retry_seconds=120)
        trainer = OPDTrainer(copy.deepcopy(student), args=args, train_dataset=prompt_dataset(12),
                             processing_class=tokenizer,
                             callbacks=[KillServerAfterStep(box, step=1, restart_after=1.0, restart=restart)])
        trainer.train()
    finally:
        stop(box["process"])
    uninterrupted = opd_run(student, tokenizer, {"teacher_model_name_or_path": str(teacher_dir)}, tmp_path / "ref",
                            rows=12, max_steps=3)
    expected = [entry["loss"] for entry in logged_steps(uninterrupted)]
    assert [entry["loss"] for entry in logged_steps(trainer)] == pytest.approx(expected, rel=1e-6)


def test_a_server_gone_too_long_stops_the_run_which_resumes_with_the_same_losses(teacher_dir, student, tokenizer,
                                                                                 tmp_path):
    port = free_port()
    url, process = start_trl_opd_server(str(teacher_dir), tmp_path / "first.log", port=port)
    box = {"process": process}
    settings = {**served_args(url), **cpu_args(max_steps=4, save_strategy="steps", save_steps=1),
                "teacher_server_retry_seconds": 1.0}
    output_dir = tmp_path / "run"
    try:
        trainer = OPDTrainer(copy.deepcopy(student), args=OPDConfig(output_dir=str(output_dir), **settings),
                             train_dataset=prompt_dataset(16), processing_class=tokenizer,
                             callbacks=[KillServerAfterStep(box, step=2)])
        with pytest.raises(TeacherServerError, match="resume_from_checkpoint=True"):
            trainer.train()
        assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
        box["process"] = start_trl_opd_server(str(teacher_dir), tmp_path / "second.log", port=port)[1]
        resumed = OPDTrainer(copy.deepcopy(student), args=OPDConfig(output_dir=str(output_dir), **settings),
                             train_dataset=prompt_dataset(16), processing_class=tokenizer)
        resumed.train(resume_from_checkpoint=True)
    finally:
        stop(box["process"])
    uninterrupted = opd_run(student, tokenizer, {"teacher_model_name_or_path": str(teacher_dir)}, tmp_path / "ref",
                            rows=16, max_steps=4)
    expected = {entry["step"]: entry["loss"] for entry in uninterrupted.state.log_history if "loss" in entry}
    got = {entry["step"]: entry["loss"] for entry in resumed.state.log_history if "loss" in entry}
    assert sorted(got) == [1, 2, 3, 4]  # steps 1-2 from the checkpoint's history, 3-4 trained after the resume
    for step in (1, 2, 3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step


# ---------------------------------------------------------------- SimCT with a served teacher (its own tokenizer)


def test_simct_with_trl_opd_server_gives_the_local_teachers_steps(student, tokenizer, tmp_path):
    from trl_opd import SimCTConfig, SimCTTrainer
    from trl_opd.testbed.models import tiny_model as char_level_model
    from trl_opd.testbed.tokenizers import char_tokenizer

    teacher_tokenizer = char_tokenizer()
    directory = tmp_path / "char-teacher"
    char_level_model(teacher_tokenizer, hidden=32, layers=1, heads=2, seed=1).save_pretrained(directory)
    teacher_tokenizer.save_pretrained(directory)
    url, process = start_trl_opd_server(str(directory), tmp_path / "server.log")

    def run(teacher: dict, name: str):
        args = SimCTConfig(output_dir=str(tmp_path / name), **teacher, **cpu_args(max_steps=2))
        trainer = SimCTTrainer(copy.deepcopy(student), args=args, train_dataset=prompt_dataset(8),
                               processing_class=tokenizer, teacher_processing_class=teacher_tokenizer)
        trainer.train()
        return logged_steps(trainer)

    try:
        served = run(served_args(url), "served")
        with pytest.raises(ValueError, match="another tokenizer"):
            SimCTTrainer(copy.deepcopy(student), args=SimCTConfig(output_dir=str(tmp_path / "x"), **served_args(url),
                                                                  **cpu_args()),
                         train_dataset=prompt_dataset(8), processing_class=tokenizer,
                         teacher_processing_class=tiny_tokenizer(vocab_size=300))
    finally:
        stop(process)
    local = run({"teacher_model_name_or_path": str(directory)}, "local")
    for expected, got in zip(local, served):
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    with pytest.raises(ValueError, match="SimCT .* vLLM server .* cannot return; trl_opd's teacher server"):
        SimCTConfig(output_dir=str(tmp_path), teacher_model_server_url=URL, **cpu_args())


# ---------------------------------------------------------------- vLLM answers that cannot be used


def vllm_entries(ranked: list[tuple[int, float]], actual: int) -> dict:
    """One position of vLLM's `prompt_logprobs`: {id: {"logprob", "rank"}} (the actual id added when off the top)."""
    entries = {str(token): {"logprob": logprob, "rank": rank} for rank, (token, logprob) in enumerate(ranked, 1)}
    entries.setdefault(str(actual), {"logprob": -9.0, "rank": 99})
    return entries


def test_vllm_answers_of_the_wrong_shape_are_errors():
    from trl_opd.serving.http import TeacherResponseError
    from trl_opd.serving.vllm_client import VLLMTeacherClient

    client = VLLMTeacherClient("http://127.0.0.1:9", model="teacher")
    out = {"sampled_logprobs": torch.zeros(1, 2), "top_k_ids": torch.full((1, 2, 2), -1),
           "top_k_logprobs": torch.zeros(1, 2, 2)}
    good = [None, vllm_entries([(3, -0.5), (4, -1.5)], 4), vllm_entries([(5, -0.1), (6, -3.0)], 7)]
    client._fill_row(out, 0, good, prompt_length=1, completion=[4, 7], top_k=2, vocab_size=8)
    assert out["top_k_ids"].tolist() == [[[3, 4], [5, 6]]] and out["sampled_logprobs"].tolist() == [[-1.5, -9.0]]
    with pytest.raises(TeacherResponseError, match="prompt log-probs for 2 positions of a 3-token sequence"):
        client._fill_row(out, 0, good[:2], prompt_length=1, completion=[4, 7], top_k=2, vocab_size=8)
    with pytest.raises(TeacherResponseError, match="below 8, the compared vocabulary"):
        client._fill_row(out, 0, [None, vllm_entries([(3, -0.5), (9, -1.5)], 3), good[2]], prompt_length=1,
                         completion=[3, 7], top_k=2, vocab_size=8)
    with pytest.raises(TeacherResponseError, match="did not score the sequence's own token 5"):
        client._fill_row(out, 0, [None, {"3": {"logprob": -0.5, "rank": 1}}, good[2]], prompt_length=1,
                         completion=[5, 7], top_k=1, vocab_size=8)
    with pytest.raises(TeacherResponseError, match="need 2 ids"):
        client._fill_row(out, 0, [None, vllm_entries([(3, -0.5)], 3), good[2]], prompt_length=1,
                         completion=[3, 7], top_k=2, vocab_size=8)
