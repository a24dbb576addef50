"""trl_opd's teacher server and its client (issue 15 item 1): every output equals the local computation, merged
requests get their own results, bad requests are refused with a message, an unreachable or restarted server is
handled by the client's retries.

Most tests serve the tiny teacher in this process (uvicorn in a thread); one starts `trl-opd serve-teacher` as a
subprocess, kills it and restarts it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import torch
from tiny import save_tiny, tiny_tokenizer
from transformers import AutoModelForCausalLM

from trl_opd import cli
from trl_opd.representation import HiddenStateCapture
from trl_opd.serving import teacher_server
from trl_opd.serving.http import (
    TENSOR_CONTENT_TYPE,
    RetryPolicy,
    TeacherResponseError,
    TeacherServerError,
    decode_tensors,
    encode_tensors,
)
from trl_opd.serving.teacher_server import build_app, last_hidden_states, tokenizer_sha256
from trl_opd.serving.trl_opd_client import TrlOpdTeacherClient

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

REPO = Path(__file__).resolve().parents[1]
KEEP = 4  # logits_to_keep: the completion's last 4 tokens are scored


@dataclass
class Teacher:
    directory: str
    tokenizer: object
    model: torch.nn.Module  # the test's own copy, for the local computations

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]


def load(directory: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Teacher:
    tokenizer = tiny_tokenizer()
    directory = save_tiny(tmp_path_factory.mktemp("teacher"), tokenizer)  # Qwen3: hidden 32, 2 layers
    return Teacher(directory, tokenizer, load(directory))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(app):
    """Serve `app` with uvicorn in a thread of this process; yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the in-process server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def url(teacher):
    # The server gets its own copy of the model: its worker thread never shares modules with the local checks.
    app = build_app(load(teacher.directory), tokenizer=teacher.tokenizer, model_name=teacher.directory)
    with serving(app) as address:
        yield address


def padded_batch(teacher: Teacher, prompt_lengths=(5, 3, 1), completion: int = 4, seed: int = 0):
    """Left-padded prompts of the given lengths followed by `completion` tokens: (input_ids, attention_mask) [B, L]."""
    generator = torch.Generator().manual_seed(seed)
    width = max(prompt_lengths) + completion
    input_ids = torch.randint(3, teacher.vocab_size, (len(prompt_lengths), width), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, length in enumerate(prompt_lengths):
        pad = width - completion - length
        input_ids[row, :pad] = teacher.tokenizer.pad_token_id
        attention_mask[row, :pad] = 0
    return input_ids, attention_mask


def trainer_hidden_states(model, input_ids, attention_mask, keep, explicit_position_ids):
    """What `OPDTrainer._hidden_states` computes (TRL's `_get_last_hidden_state` without explicit positions), called
    on stand-ins for the trainer: only the attributes those methods read."""
    from trl import DistillationTrainer

    from trl_opd.trainers.opd_trainer import OPDTrainer

    trl_side = SimpleNamespace(model_kwarg_keys=inspect.signature(model.forward).parameters.keys(), _is_vlm=False)
    trainer = SimpleNamespace(
        args=SimpleNamespace(explicit_position_ids=explicit_position_ids),
        _get_last_hidden_state=functools.partial(DistillationTrainer._get_last_hidden_state, trl_side),
    )
    with torch.no_grad():
        return OPDTrainer._hidden_states(trainer, model, input_ids, attention_mask, keep)


# ------------------------------------------------------------------------------------------------- pure functions


def test_last_hidden_states_are_the_trainers_bit_for_bit(teacher):
    input_ids, attention_mask = padded_batch(teacher)
    for explicit in (False, True):
        with torch.no_grad():
            ours = last_hidden_states(teacher.model, input_ids, attention_mask, KEEP, explicit_position_ids=explicit)
        assert ours.shape == (3, KEEP, 32)
        assert torch.equal(ours, trainer_hidden_states(teacher.model, input_ids, attention_mask, KEEP, explicit))


def test_logits_in_chunks_give_the_same_log_probs(teacher, monkeypatch):
    input_ids, attention_mask = padded_batch(teacher)  # B·C = 12 rows: chunks of 5, 5 and 2
    token_ids = torch.randint(0, teacher.vocab_size, (3, KEEP, 2), generator=torch.Generator().manual_seed(2))
    request = teacher_server.ScoreRequest(
        teacher_server.ScoreOptions(logits_to_keep=KEEP, top_k=3, sampled=True, temperature=1.5),
        {"input_ids": input_ids, "attention_mask": attention_mask, "token_ids": token_ids},
    )
    head = teacher_server.output_head(teacher.model)
    whole = teacher_server.score(teacher.model, head, request)
    monkeypatch.setattr(teacher_server, "LOGIT_ROWS", 5)
    chunked = teacher_server.score(teacher.model, head, request)
    assert whole.keys() == chunked.keys() == {"token_logprobs", "top_k_ids", "top_k_logprobs", "sampled_logprobs"}
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------- the protocol


def test_info_and_head(url, teacher):
    client = TrlOpdTeacherClient(url + "/")
    client.check_ready()
    info = client.info()
    assert info == {
        "backend": "trl_opd", "model": teacher.directory, "vocab_size": teacher.vocab_size, "hidden_size": 32,
        "num_layers": 2, "max_length": 256, "tokenizer_vocab_size": len(teacher.tokenizer),
        "tokenizer_sha256": tokenizer_sha256(teacher.tokenizer), "dtype": "float32",
    }
    head = client.head()
    assert client.head() is head  # fetched once
    assert torch.equal(head.weight, teacher.model.lm_head.weight.detach())
    assert head.bias is None and head.softcap is None and head.scale == 1.0 and head.vocab_size is None


def test_score_equals_a_local_forward(url, teacher):
    """Left-padded rows, temperature 0.7: every output against the model's own logits and a local capture."""
    client = TrlOpdTeacherClient(url)
    input_ids, attention_mask = padded_batch(teacher)
    token_ids = torch.randint(0, teacher.vocab_size, (3, KEEP, 5), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([[8, 7], [6, 5], [8, 2]])
    answer = client.score(input_ids, attention_mask, logits_to_keep=KEEP, last_hidden=True, layers=[1, 2],
                          positions=positions, token_ids=token_ids, temperature=0.7, top_k=6, sampled=True)

    with torch.no_grad(), HiddenStateCapture(teacher.model, [1, 2], positions=positions) as capture:
        logits = teacher.model(input_ids=input_ids, attention_mask=attention_mask).logits
    logprobs = torch.log_softmax(logits[:, :-1][:, -KEEP:] / 0.7, dim=-1)
    close = functools.partial(torch.testing.assert_close, rtol=0, atol=1e-5)
    with torch.no_grad():
        local_hidden = last_hidden_states(teacher.model, input_ids, attention_mask, KEEP, explicit_position_ids=False)
    torch.testing.assert_close(answer["last_hidden"], local_hidden, rtol=0, atol=1e-6)
    close(answer["layer_1"], capture.states[0])
    close(answer["layer_2"], capture.states[1])
    close(answer["token_logprobs"], logprobs.gather(-1, token_ids))
    top = logprobs.topk(6, dim=-1)
    assert torch.equal(answer["top_k_ids"], top.indices)
    close(answer["top_k_logprobs"], top.values)
    close(answer["sampled_logprobs"], logprobs.gather(-1, input_ids[:, -KEEP:, None]).squeeze(-1))
    assert answer["token_logprobs"].dtype == answer["top_k_logprobs"].dtype == torch.float32

    explicit = client.score(input_ids, attention_mask, logits_to_keep=KEEP, last_hidden=True,
                            explicit_position_ids=True)
    assert set(explicit) == {"last_hidden"}
    with torch.no_grad():
        local = last_hidden_states(teacher.model, input_ids, attention_mask, KEEP, explicit_position_ids=True)
    torch.testing.assert_close(explicit["last_hidden"], local, rtol=0, atol=1e-6)


def test_concurrent_requests_get_the_results_they_get_alone(teacher):
    """Four requests that can share a forward and two that cannot, sent at once from six threads."""
    app = build_app(load(teacher.directory), model_name="tiny", max_batch_size=6, batch_wait_ms=0)
    worker = app.state.worker
    common = {"logits_to_keep": KEEP, "last_hidden": True, "top_k": 3, "sampled": True}
    calls = [(padded_batch(teacher, lengths, seed=seed), common)
             for seed, lengths in enumerate([(5, 3, 1), (5, 5), (2, 5, 4, 1), (5,)])]
    calls.append((padded_batch(teacher, (5, 2), seed=7), {**common, "temperature": 2.0}))  # other meta
    calls.append((padded_batch(teacher, (3, 1), seed=8), common))  # other L
    with serving(app) as address:
        clients = [TrlOpdTeacherClient(address) for _ in calls]
        for client in clients:
            client.info()
        alone = [client.score(*batch, **options) for client, (batch, options) in zip(clients, calls)]
        forwards_alone = worker.forwards
        worker.batch_wait = 10  # seconds: the six requests are taken together however slowly they arrive
        together, barrier = [None] * len(calls), threading.Barrier(len(calls))

        def ask(index):
            barrier.wait()
            batch, options = calls[index]
            together[index] = clients[index].score(*batch, **options)

        threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(calls))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert forwards_alone == len(calls)
    assert worker.forwards - forwards_alone == 3  # the four alike in one forward, the other two alone
    for mine, reference in zip(together, alone):
        assert mine.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(mine[name], reference[name], rtol=0, atol=1e-6)
        assert torch.equal(mine["top_k_ids"], reference["top_k_ids"])


def test_a_failing_merged_forward_falls_back_to_one_request_at_a_time(teacher):
    """A merged forward that fails (e.g. out of memory) is retried request by request; a request that fails alone is
    HTTP 500 with the model's error, and the others still get their answers."""
    app = build_app(load(teacher.directory), model_name="tiny", max_batch_size=3, batch_wait_ms=0)
    worker, score, forwards = app.state.worker, app.state.worker._score, []
    poisoned = 7  # the first token of the request that breaks the model

    def fragile(request):
        forwards.append(request.rows)
        if request.rows > 3:
            raise RuntimeError("out of memory")
        if int(request.tensors["input_ids"][0, 0]) == poisoned:
            raise ValueError("broken")
        return score(request)

    worker._score = fragile
    batches = [padded_batch(teacher, (5, 4), seed=seed) for seed in range(3)]
    batches[2][0][0, 0] = poisoned
    meta = {"logits_to_keep": KEEP, "sampled": True}
    with serving(app) as address:
        alone = [post(address, {"input_ids": ids, "attention_mask": mask}, meta) for ids, mask in batches[:2]]
        replies, barrier = [None] * 3, threading.Barrier(3)
        worker.batch_wait = 10  # seconds: the three requests are taken together however slowly they arrive

        def ask(index):
            barrier.wait()
            ids, mask = batches[index]
            replies[index] = post(address, {"input_ids": ids, "attention_mask": mask}, meta)

        threads = [threading.Thread(target=ask, args=(index,)) for index in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert forwards == [2, 2, 6, 2, 2, 2]  # two alone; then the merged try, and each of the three alone
    for reply, reference in zip(replies, alone):
        assert reply.status_code == 200
        assert torch.equal(decode_tensors(reply.content)[0]["sampled_logprobs"],
                           decode_tensors(reference.content)[0]["sampled_logprobs"])
    assert replies[2].status_code == 500
    assert replies[2].json() == {"error": "The teacher model failed: ValueError: broken"}


def post(url, tensors, meta):
    return requests.post(f"{url}/score", data=encode_tensors(tensors, meta),
                         headers={"Content-Type": TENSOR_CONTENT_TYPE}, timeout=30)


def test_bad_requests_are_refused_naming_the_problem(url, teacher):
    input_ids, attention_mask = padded_batch(teacher)  # [3, 9]
    good = {"input_ids": input_ids, "attention_mask": attention_mask}
    too_large = torch.full((3, KEEP, 1), teacher.vocab_size)
    cases = [
        ({**good, "input_ids": input_ids.int()}, {"logits_to_keep": KEEP, "last_hidden": True}, "must be int64"),
        (good, {"logits_to_keep": 9, "last_hidden": True}, "at most L - 1 = 8"),
        (good, {"logits_to_keep": 0, "last_hidden": True}, "logits_to_keep=0"),
        (good, {"last_hidden": True}, "needs logits_to_keep"),
        ({**good, "attention_mask": attention_mask[:, 1:]}, {"logits_to_keep": KEEP, "last_hidden": True},
         "they must match"),
        ({**good, "positions": torch.zeros(3, 1, dtype=torch.long)}, {"logits_to_keep": KEEP, "layers": [3]},
         "out of range"),
        (good, {"logits_to_keep": KEEP, "layers": [1]}, "positions [B, K] are needed"),
        ({**good, "token_ids": too_large}, {"logits_to_keep": KEEP}, f"vocabulary is [0, {teacher.vocab_size})"),
        ({**good, "token_ids": too_large[:, :2]}, {"logits_to_keep": KEEP}, "token_ids must be [B, C, m]"),
        (good, {"logits_to_keep": KEEP, "temprature": 0.5, "last_hidden": True}, "Unknown meta keys ['temprature']"),
        (good, {"logits_to_keep": KEEP, "temperature": 0}, "temperature=0 must be"),
        (good, {"logits_to_keep": KEEP}, "asks for nothing"),
    ]
    for tensors, meta, message in cases:
        response = post(url, tensors, meta)
        assert response.status_code == 422, (meta, response.text)
        assert message in response.json()["error"], (message, response.json())
    garbage = requests.post(f"{url}/score", data=b"not tensors", timeout=30)
    assert garbage.status_code == 422 and "safetensors" in garbage.json()["error"]
    # Through the client: a 422 is not retried, and says what to change.
    client = TrlOpdTeacherClient(url, RetryPolicy(retry_seconds=60))
    started = time.monotonic()
    with pytest.raises(TeacherResponseError, match="HTTP 422.*logits_to_keep=9 must be at most"):
        client.score(input_ids, attention_mask, logits_to_keep=9, sampled=True)
    assert time.monotonic() - started < 5


def test_the_client_checks_the_answers_shapes_and_ids(url, teacher, monkeypatch):
    client = TrlOpdTeacherClient(url)
    input_ids, attention_mask = padded_batch(teacher)
    vocab_size = teacher.vocab_size

    def answering(tensors):
        response = requests.Response()
        response.status_code, response._content = 200, encode_tensors(tensors)
        return lambda *args, **kwargs: response

    client.info()
    right = {"top_k_ids": torch.zeros(3, KEEP, 2, dtype=torch.long), "top_k_logprobs": torch.zeros(3, KEEP, 2)}
    wrong = [
        ({**right, "top_k_logprobs": torch.zeros(3, KEEP, 3)}, r"top_k_logprobs has shape \(3, 4, 3\); expected"),
        ({**right, "top_k_ids": torch.full((3, KEEP, 2), vocab_size)}, f"ids in \\[0, {vocab_size}\\)"),
        ({"top_k_ids": right["top_k_ids"]}, "asked for"),
        ({**right, "top_k_logprobs": torch.zeros(3, KEEP, 2, dtype=torch.float64)}, "not float32"),
    ]
    for answer, message in wrong:
        monkeypatch.setattr(client, "_call", answering(answer))
        with pytest.raises(TeacherResponseError, match=message):
            client.score(input_ids, attention_mask, logits_to_keep=KEEP, top_k=2)
    monkeypatch.setattr(client, "_call", answering(right))
    assert client.score(input_ids, attention_mask, logits_to_keep=KEEP, top_k=2).keys() == right.keys()


def test_check_ready_on_a_closed_port_fails_at_once():
    port = free_port()  # bound and released: nothing listens there
    client = TrlOpdTeacherClient(f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(TeacherServerError) as raised:
        client.check_ready(wait_seconds=0)
    assert time.monotonic() - started < 1.5
    assert f"http://127.0.0.1:{port}" in str(raised.value)
    assert f"trl-opd serve-teacher MODEL --port {port}" in str(raised.value)


# ------------------------------------------------------------------------------------------------- the command


def test_serve_teacher_help():
    finished = subprocess.run([sys.executable, "-m", "trl_opd.cli", "serve-teacher", "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=60, check=False)
    assert finished.returncode == 0, finished.stderr
    assert "usage: trl-opd serve-teacher" in finished.stdout
    for option in ("MODEL", "--host", "--port", "--dtype", "--device", "--max_batch_size", "--batch_wait_ms"):
        assert option in finished.stdout


def test_serve_teacher_without_the_extra_says_what_to_install(monkeypatch, capsys):
    find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name, *args: None if name == "uvicorn" else find_spec(name, *args))
    with pytest.raises(SystemExit) as stopped:
        cli.main(["serve-teacher", "some/model"])
    assert stopped.value.code == 2
    assert 'needs uvicorn: pip install "trl_opd[serve]"' in capsys.readouterr().err


def start_server(directory: str, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}
    command = [sys.executable, "-m", "trl_opd.cli", "serve-teacher", directory, "--port", str(port),
               "--device", "cpu", "--dtype", "float32"]
    with open(log, "a") as output:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)


def test_real_server_survives_a_kill_and_restart(teacher, tmp_path):
    """`trl-opd serve-teacher` in a subprocess: a request sent while it is down succeeds once it is back."""
    port, log = free_port(), tmp_path / "server.log"
    client = TrlOpdTeacherClient(f"http://127.0.0.1:{port}",
                                 RetryPolicy(timeout=30, retry_seconds=60, backoff_initial=0.2, backoff_max=1.0))
    input_ids, attention_mask = padded_batch(teacher)
    options = {"logits_to_keep": KEEP, "last_hidden": True, "top_k": 4, "sampled": True}
    server = start_server(teacher.directory, port, log)
    try:
        client.check_ready(wait_seconds=60)
        assert f"trl_opd teacher server: {teacher.directory} on http://127.0.0.1:{port}" in log.read_text()
        first = client.score(input_ids, attention_mask, **options)
        assert torch.equal(client.head().weight, teacher.model.lm_head.weight.detach())
        with torch.no_grad():
            local = last_hidden_states(teacher.model, input_ids, attention_mask, KEEP, explicit_position_ids=False)
        torch.testing.assert_close(first["last_hidden"], local, rtol=0, atol=1e-6)

        server.kill()
        server.wait(30)
        outcome = {}

        def ask():
            try:
                outcome["answer"] = client.score(input_ids, attention_mask, **options)
            except Exception as error:  # noqa: BLE001  reported by the assertion below
                outcome["error"] = error

        asking = threading.Thread(target=ask)
        asking.start()
        time.sleep(0.5)  # the request is failing and being retried while the server is down
        assert asking.is_alive()
        server = start_server(teacher.directory, port, log)
        asking.join(90)
        assert "answer" in outcome, (outcome, log.read_text()[-3000:])
        assert outcome["answer"].keys() == first.keys()
        for name in first:
            assert torch.equal(outcome["answer"][name], first[name]), name
    finally:
        server.kill()
        server.wait(30)
