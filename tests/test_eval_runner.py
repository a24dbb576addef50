"""evaluate_math end to end on CPU: prompts, backends (transformers, OpenAI-compatible server), cache, reports,
the command-line evaluators (including a killed run that resumes) and the trainer callback.

The model is a tiny random Qwen3 built in code (``tests/tiny.py``, ``reference/trl.md`` §11): its answers are
wrong, the plumbing is what is tested.
"""

import importlib.resources
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import datasets
import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from trl_opd.eval import evaluate_math
from trl_opd.eval.backends import Completion, SamplingSettings, TransformersBackend
from trl_opd.eval.prompts import DEFAULT_PROMPT_TEMPLATE, PRESETS, build_prompt
from trl_opd.eval.runner import make_backend, resolve_benchmarks

REPO = Path(__file__).resolve().parents[1]
PROBLEMS = [{"problem": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in ((1, 2), (3, 4), (5, 6))]
QWEN3_TEMPLATE = (importlib.resources.files("trl.chat_templates") / "qwen3.jinja").read_text()


def eval_tokenizer():
    """The shared tiny BPE, trained on this file's prompts, with Qwen3's chat template (it reads enable_thinking)."""
    texts = [
        DEFAULT_PROMPT_TEMPLATE.replace("{problem}", p["problem"]) + " \\boxed{" + p["answer"] + "}"
        for p in PROBLEMS
    ] * 4 + ["user assistant system think 0123456789"]
    tokenizer = tiny_tokenizer(texts, vocab_size=400)
    tokenizer.chat_template = QWEN3_TEMPLATE
    return tokenizer


def eval_model(tokenizer, max_positions=256):
    model = tiny_model(tokenizer)
    model.config.max_position_embeddings = max_positions  # the context the evaluator budgets against
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return eval_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return eval_model(tokenizer)


@pytest.fixture(scope="module")
def toy():
    return datasets.Dataset.from_list(PROBLEMS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer, model):
    directory = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


class ScriptedBackend:
    """Answers correctly on even sample seeds' turns: sample j of each problem is right iff j is even."""

    name = "scripted"
    chunk_size = 4

    def __init__(self, answers_by_prompt):
        self.answers_by_prompt = answers_by_prompt
        self.requests = []

    def generate(self, requests):
        completions = []
        for request in requests:
            self.requests.append(request)
            sample = sum(1 for r in self.requests if r.prompt == request.prompt) - 1
            answer = self.answers_by_prompt[request.prompt] if sample % 2 == 0 else "0"
            completions.append(Completion(f"<think>hmm</think>So \\boxed{{{answer}}}", 7, "stop"))
        return completions

    def close(self):
        raise AssertionError("evaluate_math must not close a backend object it did not build")


# --------------------------------------------------------------------------------------------------
# Prompts and backend choice
# --------------------------------------------------------------------------------------------------


def test_prompts_follow_the_r1_convention_with_thinking_flags(tokenizer):
    plain, chat = build_prompt("What is 1 + 2?", None)
    assert (
        plain == "What is 1 + 2?\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    assert chat is False
    thinking, chat = build_prompt("What is 1 + 2?", tokenizer)
    assert (
        chat and thinking.startswith("<|im_start|>user\nWhat is 1 + 2?") and thinking.endswith("assistant\n")
    )
    no_thinking, _ = build_prompt(
        "What is 1 + 2?", tokenizer, enable_thinking=False, system_prompt="Be brief."
    )
    assert no_thinking.startswith("<|im_start|>system\nBe brief.") and no_thinking.endswith(
        "<think>\n\n</think>\n\n"
    )
    forced_plain, chat = build_prompt("Q", tokenizer, use_chat_template=False, template="Solve: {problem}")
    assert (forced_plain, chat) == ("Solve: Q", False)
    with pytest.raises(ValueError, match="{problem}"):
        build_prompt("Q", None, template="no placeholder")
    with pytest.raises(ValueError, match="no chat template"):
        build_prompt("Q", None, use_chat_template=True)
    assert PRESETS["r1"] == dict(n=16, temperature=0.6, top_p=0.95, top_k=None, max_new_tokens=32768)


def test_backend_choice(model, tokenizer):
    sampling = SamplingSettings()
    assert make_backend(model, tokenizer=tokenizer, sampling=sampling).name == "transformers"
    assert make_backend("served", base_url="http://127.0.0.1:1/v1", sampling=sampling).name == "openai"
    with pytest.raises(ValueError, match="not a model object"):
        make_backend(model, backend="vllm", sampling=sampling)
    with pytest.raises(ValueError, match="backend must be one of"):
        make_backend(model, backend="tgi", sampling=sampling)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        make_backend(model, sampling=sampling)
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(top_p=0.0)


def test_transformers_backend_clips_the_budget_to_the_context(tokenizer):
    small = eval_model(tokenizer, max_positions=48)
    one_problem = datasets.Dataset.from_list(PROBLEMS[:1])
    summary = evaluate_math(
        small, one_problem, tokenizer=tokenizer, n=1, progress=False
    )  # 32,768 new tokens asked
    prompt, _ = build_prompt(PROBLEMS[0]["problem"], tokenizer)
    budget = 48 - len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert 1 <= summary["benchmarks"]["custom_0"]["mean_completion_tokens"] <= budget


# --------------------------------------------------------------------------------------------------
# End to end with the tiny model; metrics through the pipeline with a scripted backend
# --------------------------------------------------------------------------------------------------


def test_evaluate_math_end_to_end_on_cpu(model, tokenizer, toy, tmp_path):
    summary = evaluate_math(
        (model, tokenizer),
        {"toy": toy},
        n=2,
        max_new_tokens=6,
        output_dir=tmp_path,
        batch_size=4,
        plot=True,
        progress=False,
    )
    results = summary["benchmarks"]["toy"]
    assert summary["backend"] == "transformers" and summary["settings"]["chat_template"] is True
    assert results["num_problems"] == 3 and results["n"] == 2
    for name in ("avg@2", "pass@1", "pass@2", "maj@2"):
        assert 0.0 <= results[name] <= 1.0 and f"{name}_stderr" in results
    assert 1 <= results["mean_completion_tokens"] <= 6
    rows = [json.loads(line) for line in (tmp_path / "samples" / "toy.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {(row["id"], row["sample"]) for row in rows} == {
        (str(i), j) for i in range(3) for j in range(2)
    }
    assert sum(row["correct"] for row in rows) / 6 == pytest.approx(results["avg@2"])
    assert json.loads((tmp_path / "summary.json").read_text())["benchmarks"]["toy"]["n"] == 2
    assert "| toy | 3 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_metrics_through_the_pipeline_and_the_cache(toy, tmp_path):
    answers = {DEFAULT_PROMPT_TEMPLATE.replace("{problem}", p["problem"]): p["answer"] for p in PROBLEMS}
    backend = ScriptedBackend(answers)
    summary = evaluate_math(
        "scripted-model", {"toy": toy}, n=4, backend=backend, output_dir=tmp_path, progress=False
    )
    results = summary["benchmarks"]["toy"]
    # samples 0 and 2 right, 1 and 3 wrong ("0"): a 2-2 tie that the right answer wins by appearing first
    assert (results["avg@4"], results["pass@2"], results["pass@4"], results["maj@4"]) == (
        0.5,
        pytest.approx(5 / 6),
        1.0,
        1.0,
    )
    assert results["avg@4_stderr"] == 0.0 and results["grading_timeouts"] == 0
    seeds = [request.seed for request in backend.requests]
    assert len(set(seeds)) == 12 and len(backend.requests) == 12

    again = ScriptedBackend(answers)
    evaluate_math("scripted-model", {"toy": toy}, n=4, backend=again, output_dir=tmp_path, progress=False)
    assert again.requests == []  # everything came from the cache
    more = ScriptedBackend(answers)
    evaluate_math("scripted-model", {"toy": toy}, n=6, backend=more, output_dir=tmp_path, progress=False)
    assert len(more.requests) == 3 * 2  # only the two new samples per problem
    assert [r.seed for r in more.requests[:2]] != seeds[:2]
    hotter = ScriptedBackend(answers)
    evaluate_math(
        "scripted-model",
        {"toy": toy},
        n=4,
        temperature=1.0,
        backend=hotter,
        output_dir=tmp_path,
        progress=False,
    )
    assert len(hotter.requests) == 12  # other settings: the cache does not apply
    fresh = ScriptedBackend(answers)
    evaluate_math(
        "scripted-model", {"toy": toy}, n=4, backend=fresh, output_dir=tmp_path, resume=False, progress=False
    )
    assert len(fresh.requests) == 12


def test_bad_arguments_fail_before_generating(toy, tmp_path):
    backend = ScriptedBackend({})
    with pytest.raises(ValueError, match="k of pass@k"):
        evaluate_math("m", {"toy": toy}, n=2, ks=[4], backend=backend)
    with pytest.raises(ValueError, match="limit"):
        evaluate_math("m", {"toy": toy}, n=2, limit=0, backend=backend)
    with pytest.raises(ValueError, match="n must be"):
        evaluate_math("m", {"toy": toy}, n=0, backend=backend)
    with pytest.raises(ValueError, match="ambiguous"):
        evaluate_math("m", ["aimo"], backend=backend)
    assert backend.requests == []
    path = tmp_path / "my_set.jsonl"
    path.write_text(json.dumps(PROBLEMS[0]) + "\n")
    assert [name for name, _ in resolve_benchmarks([str(path), "aime24"], limit=1)] == ["my_set", "aime24"]


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible completions endpoint
# --------------------------------------------------------------------------------------------------


class _CompletionsHandler(BaseHTTPRequestHandler):
    received = []

    def do_POST(self):  # noqa: N802 - http.server naming
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append((self.path, self.headers.get("Authorization"), payload))
        a, b = map(int, re.search(r"What is (\d+) \+ (\d+)\?", payload["prompt"]).groups())
        body = json.dumps(
            {
                "choices": [{"text": f"The sum is \\boxed{{{a + b}}}.", "finish_reason": "stop"}],
                "usage": {"completion_tokens": 9},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_openai_completions_backend_against_a_local_server(toy):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CompletionsHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        summary = evaluate_math(
            "served-model",
            {"toy": toy},
            n=2,
            top_k=20,
            max_new_tokens=64,
            base_url=f"http://127.0.0.1:{server.server_port}/v1",
            api_key="sk-test",
            max_concurrency=3,
            progress=False,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert summary["backend"] == "openai"
    results = summary["benchmarks"]["toy"]
    assert results["avg@2"] == 1.0 and results["mean_completion_tokens"] == 9
    received = _CompletionsHandler.received
    assert len(received) == 6
    path, authorization, payload = received[0]
    assert path == "/v1/completions" and authorization == "Bearer sk-test"
    assert {key: payload[key] for key in ("model", "temperature", "top_p", "top_k", "max_tokens", "n")} == {
        "model": "served-model",
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
        "max_tokens": 64,
        "n": 1,
    }
    assert len({p["seed"] for _, _, p in received}) == 6
    assert payload["prompt"].endswith("within \\boxed{}.")  # no tokenizer: plain prompt


# --------------------------------------------------------------------------------------------------
# Command line: --help, and a killed run that resumes without regenerating
# --------------------------------------------------------------------------------------------------


def _cli_env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


@pytest.mark.parametrize("script", ["aime.py", "aimo.py"])
def test_cli_help(script):
    result = subprocess.run(
        [sys.executable, str(REPO / "eval" / script), "--help"],
        capture_output=True,
        text=True,
        env=_cli_env(),
        timeout=60,
    )
    assert result.returncode == 0
    for words in ("--model", "--benchmarks", "--n", "avg@n", "pass@k", "maj@n", "resum"):
        assert words in result.stdout
    if script == "aimo.py":
        assert "89 of its 90" in result.stdout


def _cache_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def test_cli_run_then_kill_then_resume_without_regenerating(model_dir, tmp_path):
    """eval/aime.py offline on two local benchmarks: the first finishes (reports written), the run is SIGKILLed
    during the second; the same command again generates only the missing samples."""
    from trl_opd.eval.cli import main

    for name, problems in (("first", PROBLEMS), ("second", PROBLEMS[::-1])):
        (tmp_path / f"{name}.jsonl").write_text(
            "\n".join(json.dumps({"question": p["problem"], "answer": p["answer"]}) for p in problems)
        )
    output = tmp_path / "out"
    arguments = [
        "--model",
        str(model_dir),
        "--benchmarks",
        str(tmp_path / "first.jsonl"),
        str(tmp_path / "second.jsonl"),
        "--problem-column",
        "question",
        "--n",
        "4",
        "--max-new-tokens",
        "12",
        "--batch-size",
        "1",
        "--backend",
        "transformers",
        "--output-dir",
        str(output),
        "--no-progress",
        "--grading-workers",
        "1",
    ]
    second_cache = output / "generations" / "second.jsonl"
    run = subprocess.Popen(
        [sys.executable, str(REPO / "eval" / "aime.py"), *arguments],
        env=_cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 180
    while not _cache_rows(second_cache) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    _, stderr = run.communicate()
    assert run.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    first_rows, before = _cache_rows(output / "generations" / "first.jsonl"), _cache_rows(second_cache)
    assert 1 <= len(before) < 12, "the run was not killed during the second benchmark"
    finished = json.loads((output / "summary.json").read_text())["benchmarks"]
    assert (
        list(finished) == ["first"] and finished["first"]["num_problems"] == 3 and finished["first"]["n"] == 4
    )
    assert "| first | 3 |" in (output / "results.md").read_text()

    generated = []
    original = TransformersBackend.generate

    def counting_generate(self, requests):
        generated.extend(requests)
        return original(self, requests)

    with (
        pytest.MonkeyPatch.context() as patch
    ):  # the same command again, in this process to count generations
        patch.setattr(TransformersBackend, "generate", counting_generate)
        assert main(arguments, prog="aime.py", description="", default_benchmarks=["aime24"]) == 0
    after = _cache_rows(second_cache)
    assert len(generated) == 12 - len(before)
    assert _cache_rows(output / "generations" / "first.jsonl") == first_rows
    assert len(after) == 12 and len({(row["id"], row["sample"]) for row in after}) == 12
    assert after[: len(before)] == before
    summary = json.loads((output / "summary.json").read_text())
    assert list(summary["benchmarks"]) == ["first", "second"] and summary["settings"]["n"] == 4


# --------------------------------------------------------------------------------------------------
# Trainer callback
# --------------------------------------------------------------------------------------------------


def _train(tokenizer, tmp_path, *, with_callback, toy=None):
    from transformers import Trainer, TrainingArguments

    from trl_opd.eval import MathEvalCallback

    model = eval_model(tokenizer)
    ids = tokenizer(["What is 1 + 2? \\boxed{3}"] * 4, add_special_tokens=False)["input_ids"]
    train = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-2,
        seed=0,
        per_device_eval_batch_size=3,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    if with_callback:
        trainer.add_callback(MathEvalCallback(trainer, {"toy": toy}, eval_steps=1, n=2, max_new_tokens=4))
    trainer.train()
    return trainer


def test_callback_logs_metrics_and_leaves_training_unchanged(tokenizer, toy, tmp_path):
    evaluated = _train(tokenizer, tmp_path / "a", with_callback=True, toy=toy)
    plain = _train(tokenizer, tmp_path / "b", with_callback=False)
    logged = [entry for entry in evaluated.state.log_history if "math_eval/toy/avg@2" in entry]
    assert [entry["step"] for entry in logged] == [1, 2]
    assert all(
        0.0 <= entry["math_eval/toy/maj@2"] <= 1.0 and entry["math_eval/toy/mean_completion_tokens"] >= 1
        for entry in logged
    )
    assert evaluated.model.training is plain.model.training
    for (name, left), (_, right) in zip(evaluated.model.named_parameters(), plain.model.named_parameters()):
        assert torch.equal(left, right), f"evaluation changed training: {name}"
