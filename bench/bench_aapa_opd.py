"""OPD against OPD + the staged AAPA anchor term (methods.md §11.3) on the testbed, three seeds.

Methods, from the same cached teacher and student, same prompts, steps, batch and learning rate (the testbed's
distillation settings, `testbed.distillation_args`: batch 32, lr 1e-3 constant, T = 1, 40 completion tokens):

* `opd`        OPDTrainer, reverse KL on student samples (the toy recipe)
* `opd_aapa`   `opd` + the AAPA anchor term, staged: weight 0 for the first third of the steps, a linear ramp to
               `--aapa-weight` over the second third, full weight for the last third

The discriminator is the one `bench_rlad.py` trains, trained the same way (`bench_rlad.train_discriminator`): once,
before the runs, on teacher samples (expert, label 1) against samples of the initial student (label 0) on 1,024
prompts disjoint from the training prompts, T = 1; its held-out accuracy is reported. The training seed (sampling,
data order) varies; the checkpoints are fixed. Held-out accuracy (300 problems, greedy) at the start of the ramp,
at full weight and at the end.

    python bench/bench_aapa_opd.py --seeds 0 1 2 --steps 150 --jobs 3
Writes bench/results/aapa_opd_<setting>.json and .md; finished runs are kept under outputs/bench_aapa_opd/ and
reused by a later call with --resume.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from bench_rlad import (
    accuracy_curve_callback,
    accuracy_tables,
    run_cached,
    run_result,
    set_up_process,
    snapshot,
    train_discriminator,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "outputs" / "bench_aapa_opd"
METHODS = ("opd", "opd_aapa")
LOGGED = ("loss", "opd/divergence", "aapa/score", "aapa/probability", "aapa/advantage_abs", "aapa/weight",
          "completions/mean_length")


def schedule(steps: int, weight: float) -> dict:
    """The staged configuration: off for the first third, ramp over the second, full weight for the last."""
    return {"aapa_weight": weight, "aapa_start_step": steps // 3, "aapa_ramp_steps": steps // 3}


def run_one(job: dict) -> dict:
    """One (method, seed): a fresh copy of the cached student, trained with accuracy evaluations. In a worker."""
    set_up_process()
    from trl_opd import OPDConfig, OPDTrainer, testbed
    from trl_opd.testbed.training import load_pretrained

    prepared = job["prepared"]
    teacher, tokenizer = load_pretrained(prepared["teacher"])
    student, _ = load_pretrained(prepared["student"])
    student.train()
    heldout = testbed.heldout_problems(prepared["task"])
    output_dir = str(WORK / f"{job['method']}_s{job['seed']}")
    method = {"aapa_discriminator_path": job["anchor_path"], **job["schedule"]} if job["method"] == "opd_aapa" else {}
    args = OPDConfig(**testbed.distillation_args(output_dir, job["seed"], job["steps"], logging_steps=job["every"]),
                     divergence="reverse_kl", **method)
    data = testbed.make_dataset(job["steps"] * 32, prepared["task"], seed=job["seed"])
    curve = accuracy_curve_callback(tokenizer, heldout, job["every"])
    trainer = OPDTrainer(student, teacher, args=args, train_dataset=data, processing_class=tokenizer,
                         callbacks=[curve])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = [{key: entry[key] for key in ("step", *LOGGED) if key in entry}
            for entry in trainer.state.log_history if "loss" in entry]
    return run_result(job, curve.points, seconds, logs)


def summarise(record: dict) -> str:
    by_method, lines = accuracy_tables(record, METHODS, {"opd_aapa": "opd"})
    lines += ["", "## Training logs (mean over seeds, per logging window)", "",
              "| method | step | divergence | anchor score s | discriminator D | mean abs advantage | anchor weight |",
              "|---|---|---|---|---|---|---|"]
    for method, rows in by_method.items():
        for index, entry in enumerate(rows[0]["logs"]):

            def mean_of(key):
                values = [r["logs"][index].get(key) for r in rows if len(r["logs"]) > index]
                return "—" if any(v is None for v in values) else f"{statistics.mean(values):.3f}"

            lines.append(f"| {method} | {entry['step']} | {mean_of('opd/divergence')} | {mean_of('aapa/score')} | "
                         f"{mean_of('aapa/probability')} | {mean_of('aapa/advantage_abs')} | "
                         f"{mean_of('aapa/weight')} |")
    d = record["discriminator"]
    lines += ["", f"AAPA discriminator (as in bench_rlad.py): {d['num_prompts']} prompts, teacher vs initial-student "
              f"samples; train accuracy {100 * d['train_accuracy']:.1f}%, held-out accuracy "
              f"{100 * d.get('validation_accuracy', float('nan')):.1f}%. Schedule: {record['schedule']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="multistrategy")
    parser.add_argument("--testbed-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--aapa-weight", type=float, default=1.0)
    parser.add_argument("--discriminator-prompts", type=int, default=1024)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--resume", action="store_true", help="reuse finished runs under outputs/bench_aapa_opd/")
    options = parser.parse_args(argv)

    set_up_process()
    import torch

    from trl_opd import testbed

    wall = time.perf_counter()
    prepared = snapshot(testbed.prepare(options.setting, seed=options.testbed_seed))
    baseline = testbed.heldout_accuracies(prepared)
    WORK.mkdir(parents=True, exist_ok=True)
    anchor_path = WORK / "anchor.pt"
    discriminator = train_discriminator(prepared, options.discriminator_prompts, anchor_path)
    print("discriminator", json.dumps(discriminator), flush=True)
    staged = schedule(options.steps, options.aapa_weight)
    jobs = [dict(setting=options.setting, prepared=prepared, seed=seed, method=method, steps=options.steps,
                 every=options.steps // 3, schedule=staged, anchor_path=str(anchor_path),
                 student_accuracy=baseline["student"], resume=options.resume)
            for seed in options.seeds for method in options.methods]
    with ProcessPoolExecutor(options.jobs, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(functools.partial(run_cached, run=run_one, work=WORK), jobs))

    record = {
        "command": "python " + " ".join([f"bench/{Path(sys.argv[0]).name}", *(argv or sys.argv[1:])]),
        "hardware": f"{os.cpu_count()}-core CPU (shared with other jobs), torch {torch.__version__}, "
                    f"1 thread per run, {options.jobs} runs at a time",
        "wall_seconds": time.perf_counter() - wall,
        "task": str(prepared["task"]),
        "checkpoints": {role: str(prepared[role]) for role in ("teacher", "student")},
        "schedule": staged,
        "baseline": baseline,
        "discriminator": discriminator,
        "results": results,
    }
    stem = RESULTS / f"aapa_opd_{options.setting}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    stem.with_suffix(".md").write_text(
        f"# OPD vs OPD + staged AAPA on the testbed ({options.setting})\n\n`{record['command']}` on "
        f"{record['hardware']}; {record['wall_seconds'] / 60:.0f} min wall.\n\n" + summarise(record))
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
