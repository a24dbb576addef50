"""Evaluation throughput: grading (Math-Verify in a process pool) and generation per backend (CPU).

Grading: every MATH-500 gold answer (500 problems, the bundled copy) is graded against three completions — the
exact answer boxed (settled by the string/number fast path), a form that only Math-Verify settles (``x = <answer>``)
and a wrong one (``<answer> + 1``). Measured: answers per second of ``grade_many`` through a ``GradingPool`` of 1 and
of 2 workers (each Math-Verify call bounded by the 5 s timeout), against calling ``math_verify`` directly in this
process without any bound (the unsafe baseline: one pathological answer would hang it). Every path must give the
same verdicts; the script checks that.

Generation: samples per second and generated tokens per second of the backends on a random-initialised testbed
model (Qwen3 architecture, 2 layers, width 96, character tokenizer, 64 new tokens per sample, sampling at T 0.6):
the transformers backend at batch sizes 1, 8 and 32, and the OpenAI-compatible completions backend against a
local HTTP server that answers with the same transformers model (what the client and the server's batching cost).
vLLM needs a GPU; on a machine with one, ``--vllm MODEL`` adds it.

    python bench/bench_eval.py            # writes bench/results/eval_cpu.json and .md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from trl_opd.eval import load_benchmark
from trl_opd.eval.backends import (
    OpenAICompletionsBackend,
    Request,
    SamplingSettings,
    TransformersBackend,
)
from trl_opd.eval.grading import GradingPool, grade_many

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------- grading


def grading_corpus() -> tuple[list[str], list[str], list[str]]:
    """(completions, gold answers, kind) for the 500 MATH-500 answers, three completions each."""
    completions, answers, kinds = [], [], []
    for row in load_benchmark("math500"):
        answer = str(row["answer"])
        for kind, text in (
            ("exact", f"Adding it up, the result is \\boxed{{{answer}}}."),
            ("equivalent", f"Therefore \\boxed{{x = {answer}}}."),
            ("wrong", f"So \\boxed{{{answer} + 1}}."),
        ):
            completions.append(text)
            answers.append(answer)
            kinds.append(kind)
    return completions, answers, kinds


def unbounded_math_verify(completions: list[str], answers: list[str]) -> list[bool]:
    """Math-Verify called directly, no pool and no time bound: the fastest unsafe way."""
    from math_verify import parse, verify

    return [bool(verify(parse(f"\\boxed{{{gold}}}"), parse(text))) for text, gold in zip(completions, answers)]


def bench_grading() -> dict:
    completions, answers, kinds = grading_corpus()
    rows = {}
    start = time.perf_counter()
    baseline = unbounded_math_verify(completions, answers)
    rows["math_verify in process, no time bound"] = time.perf_counter() - start
    verdicts = {}
    for workers in (1, 2):
        with GradingPool(num_workers=workers, timeout=5.0) as pool:
            grade_many(completions[:4], answers[:4], pool=pool)  # start the workers outside the timing
            start = time.perf_counter()
            results = grade_many(completions, answers, pool=pool)
            rows[f"grade_many, pool of {workers}"] = time.perf_counter() - start
        verdicts[workers] = results
    methods = {}
    for result in verdicts[1]:
        methods[result.method] = methods.get(result.method, 0) + 1
    agreement = sum(r.correct == b for r, b in zip(verdicts[1], baseline)) / len(baseline)
    same_across_pools = [r.correct for r in verdicts[1]] == [r.correct for r in verdicts[2]]
    return {
        "answers": len(completions),
        "kinds": {kind: kinds.count(kind) for kind in sorted(set(kinds))},
        "correct_by_kind": {
            kind: sum(r.correct for r, k in zip(verdicts[1], kinds) if k == kind) for kind in sorted(set(kinds))
        },
        "grading_methods": methods,
        "agreement_with_unbounded_math_verify": agreement,
        "same_verdicts_with_1_and_2_workers": same_across_pools,
        "seconds": rows,
        "answers_per_second": {name: len(completions) / seconds for name, seconds in rows.items()},
    }


# ---------------------------------------------------------------- generation


def testbed_model():
    from trl_opd.testbed.models import tiny_model
    from trl_opd.testbed.tokenizers import char_tokenizer

    tokenizer = char_tokenizer()
    model = tiny_model(tokenizer, hidden=96, layers=2, seed=0).eval()
    return model, tokenizer


def requests(count: int) -> list[Request]:
    return [Request(prompt=f"Compute {10 + i}+{20 + 2 * i}.", seed=i) for i in range(count)]


def throughput(backend, count: int) -> dict:
    backend.generate(requests(2))  # warm-up
    start = time.perf_counter()
    completions = backend.generate(requests(count))
    seconds = time.perf_counter() - start
    tokens = sum(completion.num_tokens for completion in completions)
    return {"samples": count, "seconds": seconds, "generated_tokens": tokens,
            "samples_per_second": count / seconds, "tokens_per_second": tokens / seconds}


def serve(backend: TransformersBackend) -> ThreadingHTTPServer:
    """A minimal OpenAI-style /v1/completions server over ``backend`` (one sample per request, serialised)."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                completion = backend.generate([Request(payload["prompt"], payload.get("seed", 0))])[0]
            body = json.dumps({"choices": [{"text": completion.text, "finish_reason": completion.finish_reason}],
                               "usage": {"completion_tokens": completion.num_tokens}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def bench_generation(samples: int, vllm_model: str | None) -> dict:
    model, tokenizer = testbed_model()
    sampling = SamplingSettings(temperature=0.6, top_p=0.95, max_new_tokens=64)
    rows = {}
    for batch_size in (1, 8, 32):
        backend = TransformersBackend(model, tokenizer, sampling, batch_size=batch_size)
        rows[f"transformers, batch {batch_size}"] = throughput(backend, samples)
    server = serve(TransformersBackend(model, tokenizer, sampling, batch_size=1))
    try:
        client = OpenAICompletionsBackend(f"http://127.0.0.1:{server.server_port}/v1", "testbed", sampling,
                                          max_concurrency=4)
        rows["openai client -> local transformers server (batch 1)"] = throughput(client, samples)
    finally:
        server.shutdown()
        server.server_close()
    if vllm_model:
        from trl_opd.eval.backends import VLLMBackend

        rows[f"vllm ({vllm_model})"] = throughput(VLLMBackend(vllm_model, sampling), samples)
    return rows


# ---------------------------------------------------------------- report


def markdown(result: dict) -> str:
    grading = result["grading"]
    lines = [
        "# Evaluation throughput (CPU)",
        "",
        f"`{result['command']}` on {result['device']}, torch {result['torch']}; load average"
        f" {result['load_average_at_start']:.1f} at the start and {result['load_average_at_end']:.1f} at the end"
        " (other jobs shared the 2 cores, so the pool of 2 had no free core to gain from).",
        "",
        f"## Grading: {grading['answers']} answers (MATH-500 gold answers × exact / Math-Verify-only / wrong)",
        "",
        "| path | seconds | answers/s | vs unbounded in-process |",
        "|---|---|---|---|",
    ]
    base = grading["seconds"]["math_verify in process, no time bound"]
    for name, seconds in grading["seconds"].items():
        lines.append(f"| {name} | {seconds:.2f} | {grading['answers'] / seconds:.0f} | {base / seconds:.2f}× |")
    lines += [
        "",
        f"Grading paths used (pool of 1): {grading['grading_methods']}; correct by kind: {grading['correct_by_kind']};"
        f" verdicts agree with unbounded Math-Verify on {grading['agreement_with_unbounded_math_verify']:.1%};"
        f" identical with 1 and 2 workers: {grading['same_verdicts_with_1_and_2_workers']}.",
        "",
        "## Generation: random-initialised testbed model (Qwen3, 2 layers × 96), 64 new tokens, T 0.6",
        "",
        "| backend | samples | seconds | samples/s | generated tokens/s |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["generation"].items():
        lines.append(f"| {name} | {row['samples']} | {row['seconds']:.2f} | {row['samples_per_second']:.1f} |"
                     f" {row['tokens_per_second']:.0f} |")
    lines += ["", "vLLM: not measured here (no GPU); `python bench/bench_eval.py --vllm MODEL` on a GPU machine.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64, help="samples per generation measurement")
    parser.add_argument("--vllm", default=None, help="also measure vLLM with this model (GPU)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(RESULTS / "eval_cpu"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {
        "command": "python bench/bench_eval.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), {args.threads} torch thread(s)",
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg()[0],
        "grading": bench_grading(),
        "generation": bench_generation(args.samples, args.vllm),
    }
    result["load_average_at_end"] = os.getloadavg()[0]
    Path(args.output + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.output + ".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
