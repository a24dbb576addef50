r"""Token selection, position weights and self-distillation on the testbed: held-out accuracy over seeds.

Methods (same prompts, steps, batch 32, lr 1e-3 constant, T = 1; the distillation seed varies, the checkpoints
are fixed, as testbed.md recommends for method comparisons):

* `opd`       external teacher, reverse KL on every completion token (the all-token baseline)
* `tip`       the same with TIP Soft-OR selection at ρ = 0.5 and `weighted_mean` (TIP's setting)
* `opsd`      no external teacher: `teacher_model="self"` (the student's frozen initial weights) with the worked
              solution as privileged context, forward KL (OPSD v3)
* `pw_opsd`   `opsd` + increasing position weights (Moderate schedule) + `sequence_mean` (PW-OPSD)
* `edge_opd`  `opsd` + 25% guided rollouts + evidence mask e_t > 0 + `weighted_mean` (EDGE-OPD, our design)
* `opsd_guided`, `opsd_evidence`  the two halves of `edge_opd` alone (ablation)

OPSD needs a student that can read a reference solution: the paper's models are pretrained LLMs that follow the
instruction in the teacher prompt, while the testbed's cached student has only ever seen bare problems. So the
self-distillation methods start from a *context-literate* student, built here once and cached: the testbed's
student recipe (2 layers, width 64, strategy 0, stopped at the first validation evaluation >= 15% on bare
prompts) with half of its SFT prompts showing the solution through `TEMPLATE`. Its accuracy with the solution in
the prompt is reported next to its accuracy without; OPSD must raise the latter. The plain cached student's
accuracy with the solution shown is reported too (it cannot use the context, so OPSD from it has no teacher signal).

    python bench/bench_selection_testbed.py --methods opd tip --seeds 0 1 2 --workers 2
    python bench/bench_selection_testbed.py --methods opsd pw_opsd edge_opd --seeds 0 1 2 --workers 2
    python bench/bench_selection_testbed.py --methods opsd_guided opsd_evidence --seeds 0 1 2 --workers 2
Each call merges its runs into bench/results/selection_testbed_<setting>.json and rewrites the .md table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("opd", "tip", "opsd", "pw_opsd", "edge_opd", "opsd_guided", "opsd_evidence")
SELF_DISTILLATION = ("opsd", "pw_opsd", "edge_opd", "opsd_guided", "opsd_evidence")
from trl_opd.testbed.context import CONTEXT_TEMPLATE as TEMPLATE  # noqa: E402
from trl_opd.testbed.context import with_context  # noqa: E402

METHOD_CONFIGS = {
    "opd": {"divergence": "reverse_kl"},
    "tip": {
        "divergence": "reverse_kl",
        "token_selection": "tip_soft_or",
        "token_ratio": 0.5,
        "loss_reduction": "weighted_mean",
    },
    "opsd": {"divergence": "forward_kl", "teacher_prompt_template": TEMPLATE},
    "pw_opsd": {
        "divergence": "forward_kl",
        "teacher_prompt_template": TEMPLATE,
        "position_weighting": "increasing",
        "loss_reduction": "sequence_mean",
    },
    "edge_opd": {
        "divergence": "forward_kl",
        "teacher_prompt_template": TEMPLATE,
        "guided_fraction": 0.25,
        "evidence_mode": "threshold",
        "evidence_threshold": 0.0,
        "loss_reduction": "weighted_mean",
    },
    "opsd_guided": {"divergence": "forward_kl", "teacher_prompt_template": TEMPLATE, "guided_fraction": 0.25},
    "opsd_evidence": {
        "divergence": "forward_kl",
        "teacher_prompt_template": TEMPLATE,
        "evidence_mode": "threshold",
        "evidence_threshold": 0.0,
        "loss_reduction": "weighted_mean",
    },
}


def training_args(output_dir: str, seed: int, steps: int) -> dict:
    from trl_opd.testbed import distillation_args

    return distillation_args(output_dir, seed, steps)


def checkpoints(setting: str, testbed_seed: int, with_context_student: bool) -> dict:
    from trl_opd import testbed

    prepared = testbed.prepare(setting, seed=testbed_seed, show_progress=False)
    if not with_context_student:
        return prepared
    from trl_opd.testbed.context import context_literate_student

    return {**prepared, "context_student": context_literate_student(prepared["task"], testbed_seed)}


def run_one(job: dict) -> dict:
    """One (method, seed): a fresh copy of the student, train, held-out accuracy. Runs in a worker process."""
    import torch

    torch.set_num_threads(1)
    from trl_opd import OPDConfig, OPDTrainer, testbed
    from trl_opd.testbed.training import load_pretrained

    self_distilled = job["method"] in SELF_DISTILLATION
    paths = checkpoints(job["setting"], job["testbed_seed"], with_context_student=self_distilled)
    student, tokenizer = load_pretrained(paths["context_student" if self_distilled else "student"])
    teacher = "self" if self_distilled else load_pretrained(paths["teacher"])[0]
    student.train()
    data = testbed.make_dataset(job["steps"] * 32, paths["task"], seed=job["seed"])
    with tempfile.TemporaryDirectory() as output_dir:
        args = OPDConfig(
            **training_args(output_dir, job["seed"], job["steps"]), **METHOD_CONFIGS[job["method"]]
        )
        trainer = OPDTrainer(student, teacher, args=args, train_dataset=data, processing_class=tokenizer)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    heldout = testbed.heldout_problems(paths["task"])
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = {
        **job,
        "accuracy": testbed.accuracy(trainer.model, tokenizer, heldout),
        "train_seconds": seconds,
        "first_log": logs[0],
        "last_log": logs[-1],
    }
    print(json.dumps({k: result[k] for k in ("method", "seed", "accuracy", "train_seconds")}), flush=True)
    return result


def baselines(setting: str, testbed_seed: int, with_context_student: bool) -> dict:
    """Held-out accuracy of every starting point, with and without the solution in the prompt."""
    from trl_opd import testbed
    from trl_opd.testbed.training import load_pretrained

    paths = checkpoints(setting, testbed_seed, with_context_student)
    heldout = testbed.heldout_problems(paths["task"])
    shown = [with_context(problem) for problem in heldout]
    scores = {}
    for name in ("teacher", "student", "context_student")[: 3 if with_context_student else 2]:
        model, tokenizer = load_pretrained(paths[name])
        scores[name] = testbed.accuracy(model, tokenizer, heldout)
        if name != "teacher":
            scores[f"{name}_with_solution"] = testbed.accuracy(model, tokenizer, shown)
    return scores


def summarise(results: list[dict], baseline: dict) -> str:
    start = {"opd": "student", "tip": "student"}
    context = ""
    if "context_student" in baseline:
        context = (f"; context-literate student {100 * baseline['context_student']:.1f}% "
                   f"({100 * baseline['context_student_with_solution']:.1f}% with the solution shown)")
    lines = [
        f"Starting points (300 held-out problems, greedy): teacher {100 * baseline['teacher']:.1f}%; student "
        f"{100 * baseline['student']:.1f}% ({100 * baseline['student_with_solution']:.1f}% with the solution "
        f"shown){context}.",
        "",
        "| method | starts from | seeds | accuracy per seed | mean ± sd | change vs start | train s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["seed"])
        if not rows:
            continue
        scores = [100 * r["accuracy"] for r in rows]
        origin = start.get(method, "context_student")
        mean, sd = statistics.mean(scores), statistics.pstdev(scores)
        lines.append(
            f"| {method} | {origin} | {', '.join(str(r['seed']) for r in rows)} | "
            + ", ".join(f"{s:.1f}" for s in scores)
            + f" | {mean:.1f} ± {sd:.1f} | {mean - 100 * baseline[origin]:+.1f} | "
            f"{statistics.mean(r['train_seconds'] for r in rows):.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setting", default="main")
    parser.add_argument("--testbed-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--workers", type=int, default=2)
    options = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    baseline = baselines(options.setting, options.testbed_seed,
                         with_context_student=bool(set(options.methods) & set(SELF_DISTILLATION)))
    print(json.dumps(baseline), flush=True)
    jobs = [
        dict(
            setting=options.setting,
            testbed_seed=options.testbed_seed,
            seed=seed,
            steps=options.steps,
            method=method,
        )
        for seed in options.seeds
        for method in options.methods
    ]
    with ProcessPoolExecutor(options.workers) as pool:
        results = list(pool.map(run_one, jobs))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"selection_testbed_{options.setting}"
    previous = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else {}
    replaced = {(r["method"], r["seed"], r["steps"]) for r in results}
    kept = [r for r in previous.get("results", []) if (r["method"], r["seed"], r["steps"]) not in replaced]
    record = {
        "commands": sorted(
            set(previous.get("commands", []))
            | {
                "python bench/"
                + " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
            }
        ),
        "hardware": f"{os.cpu_count()}-core CPU shared with other jobs, torch {torch.__version__}, 1 thread per run",
        "baseline": {**previous.get("baseline", {}), **baseline},
        "template": TEMPLATE,
        "results": kept + results,
    }
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2))
    steps = sorted({r["steps"] for r in record["results"]})
    tables = [
        f"## {n} steps\n\n" + summarise([r for r in record["results"] if r["steps"] == n], record["baseline"])
        for n in steps
    ]
    stem.with_suffix(".md").write_text(
        f"# Token selection, position weights and self-distillation on the testbed ({options.setting})\n\n"
        + "\n".join(f"`{command}`" for command in record["commands"])
        + f" on {record['hardware']}.\n\n"
        + "\n".join(tables)
    )
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
