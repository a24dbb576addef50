"""MonoSoup of an OPD-distilled student on the testbed: in-distribution and harder-difficulty accuracy.

For each distillation seed: OPD (trl_opd.OPDTrainer, reverse KL, the toy recipe's settings: lr 1e-3 constant,
batch 32, T = 1, `--steps` steps) from the cached student W_0 to the distilled W_1, then
`trl_opd.merge.monosoup(W_0, W_1)` in both modes (`erank`, and `energy` with R = 0.8). Every model is scored
with greedy decoding on the 300 held-out problems of the task (in distribution) and of `task.harder()` (one
more operation: longer chains than any seen in training). methods.md §12.3: MonoSoup's effect on OPD students
is untested by the paper (it studies fine-tuning).

    python bench/bench_monosoup.py --setting main --seeds 0 1 2 --steps 300

Writes bench/results/monosoup_<setting>.json and .md. Runs sequentially on one thread (the CPU is shared).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

from bench_foresight import opd_args, setup_process, testbed_parser, write_results

MODELS = ("student_before", "opd", "monosoup_erank", "monosoup_energy")


def distil(student, teacher, tokenizer, data, seed: int, steps: int):
    from trl_opd import OPDTrainer

    with tempfile.TemporaryDirectory() as output_dir:
        trainer = OPDTrainer(
            student,
            teacher,
            args=opd_args(output_dir, seed, steps),
            train_dataset=data,
            processing_class=tokenizer,
        )
        trainer.train()
    return trainer.model


def soup(base, tuned, **monosoup_kwargs):
    """A copy of `tuned` holding MonoSoup(base, tuned)."""
    import copy

    from trl_opd.merge import monosoup

    merged = copy.deepcopy(tuned)
    merged.load_state_dict(monosoup(base.state_dict(), tuned.state_dict(), **monosoup_kwargs))
    return merged


def run_seed(options, seed: int) -> dict:
    from trl_opd import testbed
    from trl_opd.testbed.training import load_pretrained

    prepared = testbed.prepare(options.setting, seed=options.testbed_seed, show_progress=False)
    task = prepared["task"]
    teacher, tokenizer = load_pretrained(prepared["teacher"])
    base, _ = load_pretrained(prepared["student"])
    student, _ = load_pretrained(prepared["student"])
    student.train()
    start = time.perf_counter()
    tuned = distil(
        student,
        teacher,
        tokenizer,
        testbed.make_dataset(options.steps * 32, task, seed=seed),
        seed,
        options.steps,
    )
    seconds = time.perf_counter() - start
    models = {
        "student_before": base,
        "opd": tuned,
        "monosoup_erank": soup(base, tuned, mode="erank"),
        "monosoup_energy": soup(base, tuned, mode="energy", energy=0.8),
    }
    problems = {
        "in_distribution": testbed.heldout_problems(task),
        "harder": testbed.heldout_problems(task.harder()),
    }
    scores = {
        name: {split: testbed.accuracy(model, tokenizer, rows) for split, rows in problems.items()}
        for name, model in models.items()
    }
    result = {"seed": seed, "opd_seconds": seconds, "accuracy": scores}
    print(json.dumps(result), flush=True)
    return result


def summarise(results: list[dict], teacher: dict, options) -> str:
    seeds = [r["seed"] for r in results]
    header = (
        f"Teacher: {100 * teacher['in_distribution']:.1f}% in distribution, "
        f"{100 * teacher['harder']:.1f}% harder. OPD {options.steps} steps; 300 held-out problems per split, "
        "greedy."
    )
    lines = [
        header,
        "",
        "| model | split | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |",
        "|---|---|" + "---|" * (len(seeds) + 1),
    ]
    for name in MODELS:
        for split in ("in_distribution", "harder"):
            values = [100 * r["accuracy"][name][split] for r in results]
            spread = statistics.pstdev(values) if len(values) > 1 else 0.0
            lines.append(
                f"| {name} | {split} | "
                + " | ".join(f"{v:.1f}" for v in values)
                + f" | {statistics.mean(values):.1f} ± {spread:.1f} |"
            )
    lines += ["", "Paired difference MonoSoup − OPD (points, per seed):"]
    for name in MODELS[2:]:
        for split in ("in_distribution", "harder"):
            diffs = [100 * (r["accuracy"][name][split] - r["accuracy"]["opd"][split]) for r in results]
            lines.append(
                f"- {name}, {split}: "
                + ", ".join(f"{d:+.1f}" for d in diffs)
                + f" (mean {statistics.mean(diffs):+.1f})"
            )
    if teacher["harder"] < 0.05:
        floor = (
            "The harder split is at the floor for every model, the teacher included: the testbed's models do not "
            "generalise to longer chains, so this split cannot show a robustness difference here."
        )
        lines += ["", floor]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = testbed_parser(__doc__)
    parser.add_argument("--steps", type=int, default=300)
    options = parser.parse_args(argv)

    setup_process()
    from trl_opd import testbed
    from trl_opd.testbed.training import load_pretrained

    prepared = testbed.prepare(options.setting, seed=options.testbed_seed)
    model, tokenizer = load_pretrained(prepared["teacher"])
    task = prepared["task"]
    teacher = {
        "in_distribution": testbed.accuracy(model, tokenizer, testbed.heldout_problems(task)),
        "harder": testbed.accuracy(model, tokenizer, testbed.heldout_problems(task.harder())),
    }
    results = [run_seed(options, seed) for seed in options.seeds]
    record = {"options": vars(options), "teacher": teacher, "results": results}
    write_results(
        f"monosoup_{options.setting}",
        f"MonoSoup of OPD students on the testbed ({options.setting})",
        record,
        summarise(results, teacher, options),
        argv,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
