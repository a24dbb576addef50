"""EffOPD on the testbed: optimizer steps of OPD to reach a target held-out accuracy, with and without
`ForesightCallback` (paper, arXiv 2605.11739: about 3x fewer steps at comparable final performance).

Both arms: trl_opd.OPDTrainer, reverse KL, the toy recipe's settings (lr 1e-3 constant unless
`--learning-rate`, batch 32, T = 1, max 40 new tokens), the same cached teacher and student, the same prompts
and distillation seed. The foresight arm adds ForesightCallback (triggers at steps 1, 2, 4, 8, ..., 5 trials,
f0 = 2 unless `--initial-factor`) scored by greedy accuracy on `--num-validation` validation problems
(disjoint from the held-out set). Progress is measured on the 300 held-out problems every `--eval-every` steps
(greedy); a run stops at the first measurement >= the highest of `--targets` or at `--max-steps`. The
foresight arm's validation evaluations are counted in its wall time and reported separately.

    python bench/bench_foresight.py --setting main --seeds 0 1 2 --targets 0.3 0.4 0.5
    python bench/bench_foresight.py --scan 32 64 --learning-rate 3e-4 --tag _lr3e-4

Writes bench/results/foresight_<setting><tag>.json and .md (with `--scan A B`: foresight_scan_<setting><tag>,
the accuracy along θ_B + α(θ_B − θ_A) of plain OPD runs). Runs sequentially on one thread (the CPU is
shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("opd", "opd_foresight")


def opd_args(output_dir: str, seed: int, steps: int, learning_rate: float = 1e-3):
    from trl_opd import OPDConfig
    from trl_opd.testbed import distillation_args

    return OPDConfig(**distillation_args(output_dir, seed, steps, learning_rate=learning_rate, logging_steps=50,
                                         divergence="reverse_kl"))


def run_arm(arm: str, options, seed: int) -> dict:
    """One OPD run of `arm` with distillation seed `seed`; stops once the held-out accuracy reaches the
    highest target (or at `--max-steps`)."""
    from trl_opd import OPDTrainer, testbed
    from trl_opd.callbacks import ForesightCallback
    from trl_opd.testbed.training import AccuracyStopCallback, load_pretrained

    prepared = testbed.prepare(options.setting, seed=options.testbed_seed, show_progress=False)
    teacher, tokenizer = load_pretrained(prepared["teacher"])
    student, _ = load_pretrained(prepared["student"])
    student.train()
    data = testbed.make_dataset(options.max_steps * 32, prepared["task"], seed=seed)
    heldout = testbed.heldout_problems(prepared["task"])
    validation = testbed.validation_problems(prepared["task"])[: options.num_validation]
    callbacks = []
    if arm == "opd_foresight":

        def validation_accuracy(model) -> float:
            return testbed.accuracy(model, tokenizer, validation)

        callbacks.append(ForesightCallback(validation_accuracy, initial_factor=options.initial_factor))
    # Registered after the foresight callback: it measures the weights the foresight step left behind.
    progress = AccuracyStopCallback(
        student, tokenizer, heldout, options.eval_every, max(options.targets), False
    )
    callbacks.append(progress)
    with tempfile.TemporaryDirectory() as output_dir:
        args = opd_args(output_dir, seed, options.max_steps, options.learning_rate)
        trainer = OPDTrainer(
            student, teacher, args=args, train_dataset=data, processing_class=tokenizer, callbacks=callbacks
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    result = {"arm": arm, "seed": seed, "steps_run": trainer.state.global_step, "curve": progress.evaluations}
    result["wall_seconds"] = seconds
    if arm == "opd_foresight":
        result["foresight_history"] = callbacks[0].history
        result["foresight_eval_seconds"] = callbacks[0].eval_seconds_total
    print(json.dumps({k: v for k, v in result.items() if k != "foresight_history"}), flush=True)
    return result


def steps_to(curve: list, target: float) -> int | None:
    """First measured step with accuracy >= target (None if never)."""
    return next((step for step, accuracy in curve if accuracy >= target), None)


def summarise(results: list[dict], baseline: dict, options) -> str:
    seeds = sorted({r["seed"] for r in results})
    by = {(r["arm"], r["seed"]): r for r in results}
    header = (
        f"Teacher {100 * baseline['teacher']:.1f}%, student before {100 * baseline['student']:.1f}% "
        f"(300 held-out problems, greedy), measured every {options.eval_every} steps, at most "
        f"{options.max_steps} steps; OPD lr {options.learning_rate:g}; "
        f"Foresight f0 = {options.initial_factor:g}, scored on {options.num_validation} validation problems. "
        "Steps to reach each held-out accuracy target:"
    )
    lines = [header, "", "| target | seed | OPD | OPD + Foresight | speed-up |", "|---|---|---|---|---|"]
    pooled = []
    for target in options.targets:
        ratios = []
        for seed in seeds:
            base, fore = by.get(("opd", seed)), by.get(("opd_foresight", seed))
            if not base or not fore:
                continue
            base_steps, fore_steps = steps_to(base["curve"], target), steps_to(fore["curve"], target)
            ratio = base_steps / fore_steps if base_steps and fore_steps else None
            ratios += [ratio] if ratio else []
            base_text = base_steps or f">{base['steps_run']}"
            fore_text = fore_steps or f">{fore['steps_run']}"
            ratio_text = "n/a" if ratio is None else f"{ratio:.2f}x"
            lines.append(f"| {100 * target:.0f}% | {seed} | {base_text} | {fore_text} | {ratio_text} |")
        if ratios:
            mean_ratio = statistics.geometric_mean(ratios)
            pooled.append(
                f"- target {100 * target:.0f}%: geometric-mean speed-up {mean_ratio:.2f}x over {len(ratios)} "
                "seed(s) where both arms reached it"
            )
    lines += ["", *pooled, "", "| seed | accepted α (step: α) | foresight eval s | wall s OPD / +Foresight |"]
    lines.append("|---|---|---|---|")
    for seed in seeds:
        base, fore = by.get(("opd", seed)), by.get(("opd_foresight", seed))
        if not base or not fore:
            continue
        jumps = ", ".join(f"{h['step']}: {h['alpha']:g}" for h in fore["foresight_history"] if h["alpha"] > 0)
        lines.append(
            f"| {seed} | {jumps or 'none'} | {fore['foresight_eval_seconds']:.1f} | "
            f"{base['wall_seconds']:.0f} / {fore['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


SCAN_ALPHAS = (0.0, 0.5, 1.0, 2.0, 4.0, 6.0)


def scan_alphas(options, seed: int) -> dict:
    """Accuracy along the extrapolated line θ_B + α(θ_B − θ_A) of one OPD run (A, B = `--scan` steps): whether
    the update direction is worth following at all on the testbed, independent of the callback's decisions."""
    from transformers import TrainerCallback

    from trl_opd import OPDTrainer, testbed
    from trl_opd.callbacks import extrapolate, select_parameters
    from trl_opd.testbed.training import load_pretrained

    first, last = options.scan
    saved = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in (first, last):
                saved[state.global_step] = {n: p.detach().clone() for n, p in select_parameters(model)}

    prepared = testbed.prepare(options.setting, seed=options.testbed_seed, show_progress=False)
    teacher, tokenizer = load_pretrained(prepared["teacher"])
    student, _ = load_pretrained(prepared["student"])
    student.train()
    data = testbed.make_dataset(last * 32, prepared["task"], seed=seed)
    with tempfile.TemporaryDirectory() as output_dir:
        args = opd_args(output_dir, seed, last, options.learning_rate)
        OPDTrainer(
            student,
            teacher,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[Snapshot()],
        ).train()
    splits = {
        "validation": testbed.validation_problems(prepared["task"]),
        "heldout": testbed.heldout_problems(prepared["task"]),
    }
    result = {"seed": seed, "alphas": list(SCAN_ALPHAS), **{split: [] for split in splits}}
    parameters = dict(select_parameters(student))
    for alpha in SCAN_ALPHAS:
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(extrapolate(saved[last][name], saved[first][name], alpha))
        for split, problems in splits.items():
            result[split].append(testbed.accuracy(student, tokenizer, problems))
    print(json.dumps(result), flush=True)
    return result


def summarise_scan(results: list[dict], options) -> str:
    first, last = options.scan
    header = (
        f"OPD lr {options.learning_rate:g}; weights θ_{last} + α(θ_{last} − θ_{first}) on the selected "
        "(attention and MLP) parameters; greedy accuracy on 300 validation / 300 held-out problems."
    )
    lines = [
        header,
        "",
        "| seed | split | " + " | ".join(f"α={a:g}" for a in SCAN_ALPHAS) + " |",
        "|---|---|" + "---|" * len(SCAN_ALPHAS),
    ]
    for result in results:
        for split in ("validation", "heldout"):
            cells = " | ".join(f"{100 * value:.1f}" for value in result[split])
            lines.append(f"| {result['seed']} | {split} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = testbed_parser(__doc__)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.4, 0.5])
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--num-validation", type=int, default=50)
    parser.add_argument("--initial-factor", type=float, default=2.0, help="ForesightCallback f0 (paper: 2)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument(
        "--scan", type=int, nargs=2, metavar=("A", "B"), help="only scan α between steps A < B"
    )
    options = parser.parse_args(argv)

    setup_process()
    if options.scan:
        results = [scan_alphas(options, seed) for seed in options.seeds]
        first, last = options.scan
        write_results(
            f"foresight_scan_{options.setting}{options.tag}",
            f"Accuracy along the update direction θ_{last} − θ_{first} ({options.setting})",
            {"options": vars(options), "results": results},
            summarise_scan(results, options),
            argv,
        )
        return 0
    from trl_opd import testbed

    prepared = testbed.prepare(options.setting, seed=options.testbed_seed)
    baseline = testbed.heldout_accuracies(prepared)
    results = [run_arm(arm, options, seed) for seed in options.seeds for arm in options.arms]
    record = {"options": vars(options), "baseline": baseline, "results": results}
    write_results(
        f"foresight_{options.setting}{options.tag}",
        f"EffOPD (ForesightCallback) on the testbed ({options.setting})",
        record,
        summarise(results, baseline, options),
        argv,
    )
    return 0


# ------------------------------------------------------------------------------- shared with bench_monosoup


def testbed_parser(doc: str) -> argparse.ArgumentParser:
    """Options every testbed bench has: the setting, the testbed seed and the distillation seeds."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="main")
    parser.add_argument("--testbed-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    return parser


def setup_process() -> None:
    """One torch thread (the CPU is shared), offline."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def write_results(stem_name: str, title: str, record: dict, summary: str, argv) -> None:
    """``bench/results/<stem_name>.json`` (command, hardware and ``record``) and ``.md`` (title + summary)."""
    import torch

    record = {
        "command": "python " + " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "hardware": f"{os.cpu_count()}-core shared CPU, torch {torch.__version__}, 1 thread",
        **record,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / stem_name
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2))
    stem.with_suffix(".md").write_text(
        f"# {title}\n\n`{record['command']}` on {record['hardware']}.\n\n{summary}"
    )
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    raise SystemExit(main())
