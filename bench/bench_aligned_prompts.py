r"""Teacher-aligned prompts (the OPD-dynamics paper's second recovery recipe) on the testbed.

The testbed's teacher and student were trained on prompts of the form "Compute 3+4-2.\n". Here the training
prompts lack the instruction word, "3+4-2.\n", a form neither model has seen, as when a student is distilled on a
prompt set that does not follow the teacher's (RL) template. `aligned_prompt_template="Compute {problem}"` gives a
share `aligned_prompt_ratio` of the rows the teacher's template (here the exact training form) for the student's
rollout and the teacher's scoring.

Methods (same prompts, steps, batch 32, lr 1e-3 constant, reverse KL, T = 1; the distillation seed varies):

* `bare`        OPD on the bare prompts (ratio 0: the template is never applied)
* `aligned_50`  OPD with the teacher's template on half of the rows (our default ratio)
* `aligned_100` OPD with the teacher's template on every row

Reported: held-out accuracy (300 problems, greedy) in the teacher's form, which is what distillation should
transfer, and in the bare form; and the logged top-k overlap ratio between student and teacher (the paper's
diagnostic: aligned prompts should start with more overlap) in the first and the last logging window (each the
mean over `logging_steps` steps, diagnostics computed at every step).

    python bench/bench_aligned_prompts.py --seeds 0 1 2 --workers 2

Writes bench/results/aligned_prompts_testbed.{json,md}.
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
TEMPLATE = "Compute {problem}"
METHODS = {"bare": 0.0, "aligned_50": 0.5, "aligned_100": 1.0}


def bare(problem: dict) -> dict:
    """The problem with its prompt stripped of the instruction word ("Compute 3+4-2.\\n" -> "3+4-2.\\n")."""
    prompt = problem["prompt"]
    assert prompt.startswith("Compute "), prompt
    return {**problem, "prompt": prompt[len("Compute "):]}


def _checkpoints(setting: str, testbed_seed: int) -> dict:
    from trl_opd import testbed

    return testbed.prepare(setting, seed=testbed_seed, show_progress=False)


def _accuracies(model, tokenizer, task) -> dict:
    from trl_opd import testbed

    heldout = testbed.heldout_problems(task)
    return {"teacher_form": testbed.accuracy(model, tokenizer, heldout),
            "bare_form": testbed.accuracy(model, tokenizer, [bare(p) for p in heldout])}


def run_one(job: dict) -> dict:
    """One (method, seed): a fresh copy of the student, train, held-out accuracy. Runs in a worker process."""
    import torch

    torch.set_num_threads(1)
    from trl_opd import OPDConfig, OPDTrainer, testbed
    from trl_opd.testbed.training import load_pretrained

    paths = _checkpoints(job["setting"], job["testbed_seed"])
    student, tokenizer = load_pretrained(paths["student"])
    teacher = load_pretrained(paths["teacher"])[0]
    student.train()
    data = testbed.make_dataset(job["steps"] * 32, paths["task"], seed=job["seed"]).map(bare)
    ratio = METHODS[job["method"]]
    aligned = {"aligned_prompt_template": TEMPLATE, "aligned_prompt_ratio": ratio} if ratio else {}
    with tempfile.TemporaryDirectory() as output_dir:
        args = OPDConfig(**testbed.distillation_args(output_dir, job["seed"], job["steps"]), divergence="reverse_kl",
                         diagnostics_steps=1, **aligned)
        trainer = OPDTrainer(student, teacher, args=args, train_dataset=data, processing_class=tokenizer)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    overlap = [e["diagnostics/overlap_ratio"] for e in trainer.state.log_history if "diagnostics/overlap_ratio" in e]
    result = {**job, **_accuracies(trainer.model, tokenizer, paths["task"]), "train_seconds": seconds,
              "overlap_first": overlap[0], "overlap_last": overlap[-1], "logging_steps": args.logging_steps}
    print(json.dumps({k: result[k] for k in ("method", "seed", "teacher_form", "bare_form", "overlap_first")}),
          flush=True)
    return result


def baselines(setting: str, testbed_seed: int) -> dict:
    from trl_opd.testbed.training import load_pretrained

    paths = _checkpoints(setting, testbed_seed)
    scores = {}
    for name in ("teacher", "student"):
        model, tokenizer = load_pretrained(paths[name])
        scores[name] = _accuracies(model, tokenizer, paths["task"])
    return scores


def _mean_sd(values, digits: int = 1) -> str:
    return f"{statistics.mean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def summarise(results: list[dict], baseline: dict) -> str:
    teacher, student = baseline["teacher"], baseline["student"]
    lines = [
        f"Starting points (300 held-out problems, greedy; teacher's form / bare form): teacher "
        f"{100 * teacher['teacher_form']:.1f}% / {100 * teacher['bare_form']:.1f}%, student "
        f"{100 * student['teacher_form']:.1f}% / {100 * student['bare_form']:.1f}%.",
        "",
        "| method | aligned ratio | seeds | teacher's form per seed | teacher's form mean ± sd | bare form mean ± sd "
        "| overlap ratio, first logging window | overlap ratio, last logging window | train s/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, ratio in METHODS.items():
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["seed"])
        if not rows:
            continue
        teacher_form = [100 * r["teacher_form"] for r in rows]
        lines.append(
            f"| {method} | {ratio} | {', '.join(str(r['seed']) for r in rows)} | "
            + ", ".join(f"{s:.1f}" for s in teacher_form)
            + f" | {_mean_sd(teacher_form)} | {_mean_sd([100 * r['bare_form'] for r in rows])} | "
            f"{_mean_sd([r['overlap_first'] for r in rows], 3)} | {_mean_sd([r['overlap_last'] for r in rows], 3)} | "
            f"{statistics.mean(r['train_seconds'] for r in rows):.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="main")
    parser.add_argument("--testbed-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--workers", type=int, default=2)
    options = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    baseline = baselines(options.setting, options.testbed_seed)
    print(json.dumps(baseline), flush=True)
    jobs = [dict(setting=options.setting, testbed_seed=options.testbed_seed, seed=seed, steps=options.steps,
                 method=method) for seed in options.seeds for method in options.methods]
    with ProcessPoolExecutor(options.workers) as pool:
        results = list(pool.map(run_one, jobs))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / "aligned_prompts_testbed"
    command = "python bench/" + " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    record = {"command": command, "template": TEMPLATE, "baseline": baseline, "results": results,
              "hardware": f"{os.cpu_count()}-core CPU, torch {torch.__version__}, 1 thread per run"}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2))
    stem.with_suffix(".md").write_text(
        f"# Teacher-aligned prompts on the testbed ({options.setting}, {options.steps} steps)\n\n"
        f"`{command}` on {record['hardware']}. Training prompts in the bare form; template {TEMPLATE!r}.\n\n"
        + summarise(results, baseline)
    )
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
