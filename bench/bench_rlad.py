"""RLAD against plain GRPO, with and without the AAPA anchor reward, on the testbed: accuracy curves, three seeds.

Methods, all from the same cached teacher and student, same prompts, steps, batch, generations and learning rate
(the toy recipe's settings, read from recipes/toy/rlad.yaml; rewards: boxed-answer accuracy + 0.1 format):

* `grpo`       RLADTrainer with rlad_alpha = 1, which trains bit for bit like trl.GRPOTrainer
               (tests/test_rlad_trainer.py::test_alpha_one_trains_exactly_like_grpo); the teacher is only scored, so
               that the teacher log-ratio is logged for both methods
* `rlad`       rlad_alpha = 0.5, teacher clamp 1 (the paper's values)
* `grpo_aapa`  `grpo` + the AAPA anchor reward (weight aapa_weight)
* `rlad_aapa`  `rlad` + the AAPA anchor reward

The AAPA discriminator (trl_opd.anchor.AnchorDiscriminator) is trained once, before the runs, on teacher samples
(expert, label 1) against samples of the initial student (label 0), on the same prompts, T = 1, disjoint from the
RL prompts; its held-out accuracy is reported. The training seed (sampling, data order) varies; the checkpoints are
fixed (testbed.md: fix the student for method comparisons and report paired differences). Held-out accuracy
(300 problems, greedy) is measured every `--eval-every` steps.

    python bench/bench_rlad.py --seeds 0 1 2 --jobs 2                # all four methods
Writes bench/results/rlad_<setting>.json and .md; each finished run is also kept under outputs/bench_rlad/ and
reused by a later call with --resume.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "outputs" / "bench_rlad"
METHODS = ("grpo", "rlad", "grpo_aapa", "rlad_aapa")
BASELINES = {"rlad": "grpo", "grpo_aapa": "grpo", "rlad_aapa": "rlad"}  # what each method is compared with
NON_CONFIG_KEYS = ("env", "testbed", "testbed_seed", "testbed_train_size", "testbed_eval_size")
LOGGED = (
    "reward",
    "rewards/math_accuracy_reward/mean",
    "rewards/anchor_reward/mean",
    "rlad/teacher_log_ratio",
    "rlad/teacher_clamp_share",
    "clip_ratio/region_mean",
    "entropy",
    "completions/mean_length",
)


def recipe_settings(path: Path = ROOT / "recipes" / "toy" / "rlad.yaml") -> dict:
    """The toy recipe's RLADConfig fields (the YAML without its environment and testbed keys)."""
    settings = yaml.safe_load(path.read_text())
    return {key: value for key, value in settings.items() if key not in NON_CONFIG_KEYS}


def method_settings(method: str, anchor_path: str | None) -> dict:
    # The GRPO baseline logs its distance to the teacher too (the teacher is then scored for the logs only).
    settings = {"rlad_alpha": 1.0 if method.startswith("grpo") else 0.5, "rlad_log_teacher_stats": True}
    if method.endswith("_aapa"):
        settings["aapa_discriminator_path"] = anchor_path
    return settings


def set_up_process() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------------------------------------- AAPA discriminator


def train_discriminator(prepared: dict, num_prompts: int, path: Path) -> dict:
    """Teacher samples (expert) vs initial-student samples on the same prompts -> a frozen discriminator file."""
    from bench_toy_opd import teacher_samples  # T = 1 samples of any model, in batches

    from trl_opd import testbed
    from trl_opd.anchor import AnchorDiscriminator
    from trl_opd.testbed.training import load_pretrained

    teacher, tokenizer = load_pretrained(prepared["teacher"])
    student, _ = load_pretrained(prepared["student"])
    prompts = list(
        testbed.make_dataset(num_prompts, prepared["task"], seed=10_000)["prompt"]
    )  # not RL prompts
    max_new_tokens = recipe_settings()["max_completion_length"]
    experts = teacher_samples(teacher, tokenizer, prompts, max_new_tokens, seed=1)
    negatives = teacher_samples(student, tokenizer, prompts, max_new_tokens, seed=2)
    discriminator = AnchorDiscriminator(num_buckets=2**16)
    metrics = discriminator.fit(experts, negatives, validation_fraction=0.2, seed=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    discriminator.save(path)
    return {"num_prompts": num_prompts, **metrics}


# ---------------------------------------------------------------------------------------------- one run


def accuracy_curve_callback(tokenizer, problems, every: int):
    from transformers import TrainerCallback

    from trl_opd.testbed import accuracy

    class AccuracyCurve(TrainerCallback):
        def __init__(self):
            self.points = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0:
                self.points.append((state.global_step, accuracy(model, tokenizer, problems)))

    return AccuracyCurve()


def run_one(job: dict) -> dict:
    """One (method, seed): a fresh copy of the cached student, train with curve evaluations. In a worker process."""
    set_up_process()
    from trl_opd import RLADConfig, RLADTrainer, testbed
    from trl_opd.rewards import boxed_format_reward, math_accuracy_reward
    from trl_opd.testbed.training import load_pretrained

    prepared = job["prepared"]  # resolved once by the parent: workers never (re)build testbed models
    teacher, tokenizer = load_pretrained(prepared["teacher"])
    student, _ = load_pretrained(prepared["student"])
    student.train()
    heldout = testbed.heldout_problems(prepared["task"])
    settings = {**recipe_settings(), **job["overrides"], **method_settings(job["method"], job["anchor_path"])}
    settings.update(
        output_dir=str(WORK / f"{job['method']}_s{job['seed']}{job['tag']}"),
        seed=job["seed"],
        max_steps=job["steps"],
        logging_steps=job["eval_every"],
        disable_tqdm=True,
    )
    data = testbed.make_dataset(
        job["steps"] * settings["per_device_train_batch_size"], prepared["task"], seed=job["seed"]
    )
    curve = accuracy_curve_callback(tokenizer, heldout, job["eval_every"])
    trainer = RLADTrainer(
        student,
        [math_accuracy_reward, boxed_format_reward],
        args=RLADConfig(**settings),
        train_dataset=data,
        processing_class=tokenizer,
        teacher_model=teacher,
        callbacks=[curve],
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = [
        {key: entry[key] for key in ("step", *LOGGED) if key in entry}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    if not curve.points or curve.points[-1][0] != trainer.state.global_step:
        curve.points.append((trainer.state.global_step, testbed.accuracy(trainer.model, tokenizer, heldout)))
    return run_result(job, curve.points, seconds, logs)


def run_result(job: dict, points: list, seconds: float, logs: list) -> dict:
    """One run's record: the job (without the prepared models), the accuracy curve from the student's accuracy at
    step 0, the final accuracy, the training time and the logs; printed in brief."""
    result = {
        **{key: value for key, value in job.items() if key != "prepared"},
        "checkpoints": {role: str(job["prepared"][role]) for role in ("teacher", "student")},
        "curve": [(0, job["student_accuracy"]), *points],
        "accuracy": points[-1][1],
        "train_seconds": seconds,
        "logs": logs,
    }
    print(json.dumps({k: result[k] for k in ("method", "seed", "accuracy", "train_seconds")}), flush=True)
    return result


def run_cached(job: dict, run=None, work: Path = WORK) -> dict:
    """`run(job)` (default `run_one`) saved under `work`, or with `--resume` the result an earlier call saved."""
    path = work / f"{job['method']}_s{job['seed']}{job.get('tag', '')}.json"
    if job["resume"] and path.exists():
        return json.loads(path.read_text())
    result = (run or run_one)(job)
    path.write_text(json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------------------------------------- report


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.pstdev(values)


def verdict(ours: list[float], baseline: list[float]) -> str:
    """testbed.md: a difference smaller than about two standard deviations (of the per-seed scores) is none."""
    difference = statistics.mean(ours) - statistics.mean(baseline)
    if len(ours) < 2 or len(baseline) < 2:
        return f"{difference:+.1f} points (one seed: no spread to judge by)"
    spread = max(statistics.pstdev(ours), statistics.pstdev(baseline), 1e-9)
    if abs(difference) < 2 * spread:
        return f"no difference ({difference:+.1f} points, 2 sd = {2 * spread:.1f})"
    return (
        f"{'ahead' if difference > 0 else 'behind'} by {abs(difference):.1f} points (2 sd = {2 * spread:.1f})"
    )


def accuracy_tables(record: dict, methods, baselines: dict) -> tuple[dict, list[str]]:
    """The runs grouped by method (in `methods` order, by seed), and the report's accuracy part: the final held-out
    accuracy per seed with mean ± sd and the verdict against each method's baseline (`baselines`: method -> the
    method it is compared with), the paired differences, and the mean accuracy curves."""
    results, baseline = record["results"], record["baseline"]
    by_method = {
        m: sorted((r for r in results if r["method"] == m), key=lambda r: r["seed"]) for m in methods
    }
    by_method = {m: rows for m, rows in by_method.items() if rows}
    seeds = sorted({r["seed"] for r in results})
    lines = [
        f"Teacher {100 * baseline['teacher']:.1f}%, student before {100 * baseline['student']:.1f}% "
        "(300 held-out problems, greedy).",
        "",
        "## Final held-out accuracy (%)",
        "",
        "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | vs baseline | train s/run |",
        "|---|" + "---|" * (len(seeds) + 3),
    ]
    final = {m: [100 * r["accuracy"] for r in rows] for m, rows in by_method.items()}
    for method, rows in by_method.items():
        mean, sd = mean_sd(final[method])
        reference = baselines.get(method)
        versus = f"vs {reference}: {verdict(final[method], final[reference])}" if reference in final else "—"
        seconds = statistics.mean(r["train_seconds"] for r in rows)
        lines.append(
            f"| {method} | "
            + " | ".join(f"{s:.1f}" for s in final[method])
            + f" | {mean:.1f} ± {sd:.1f} | {versus} | {seconds:.0f} |"
        )
    for method, reference in baselines.items():
        if method in final and reference in final:
            paired = [a - b for a, b in zip(final[method], final[reference])]
            lines += ["", f"Paired {method} − {reference} per seed: {', '.join(f'{d:+.1f}' for d in paired)}."]
    lines += ["", "## Accuracy curves (%, mean over seeds)", ""]
    steps = [step for step, _ in next(iter(by_method.values()))[0]["curve"]]
    lines += ["| step | " + " | ".join(by_method) + " |", "|---|" + "---|" * len(by_method)]
    for index, step in enumerate(steps):
        cells = [statistics.mean(100 * r["curve"][index][1] for r in rows) for rows in by_method.values()]
        lines.append(f"| {step} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return by_method, lines


def summarise(record: dict) -> str:
    by_method, lines = accuracy_tables(record, METHODS, BASELINES)
    lines += [
        "",
        "## Training diagnostics (mean over seeds; first / last logging window)",
        "",
        "| method | teacher log-ratio (k1 KL to teacher) | teacher-clamp rate | clip ratio | task reward |",
        "|---|---|---|---|---|",
    ]
    for method, rows in by_method.items():

        def first_last(key):
            values = [(r["logs"][0].get(key), r["logs"][-1].get(key)) for r in rows if r["logs"]]
            if not values or any(v is None for pair in values for v in pair):
                return "—"
            return (
                f"{statistics.mean(a for a, _ in values):.3f} → {statistics.mean(b for _, b in values):.3f}"
            )

        lines.append(
            f"| {method} | {first_last('rlad/teacher_log_ratio')} | {first_last('rlad/teacher_clamp_share')}"
            f" | {first_last('clip_ratio/region_mean')} | {first_last('rewards/math_accuracy_reward/mean')} |"
        )
    if record.get("discriminator"):
        d = record["discriminator"]
        lines += [
            "",
            f"AAPA discriminator: {d['num_prompts']} prompts, teacher vs initial-student samples; train "
            f"accuracy {100 * d['train_accuracy']:.1f}%, held-out accuracy "
            f"{100 * d.get('validation_accuracy', float('nan')):.1f}%.",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main


def snapshot(prepared: dict) -> dict:
    """Copies of the cached checkpoints under outputs/: runs started later still find them if the testbed's cache
    is rebuilt meanwhile (its keys change whenever its training recipe does)."""
    copies = {}
    for role in ("teacher", "student"):
        source = Path(prepared[role])
        copies[role] = WORK / "checkpoints" / source.name
        shutil.copytree(source, copies[role], dirs_exist_ok=True)
    return {**prepared, **copies}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setting", default="multistrategy")
    parser.add_argument("--testbed-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=None, help="default: the toy recipe's max_steps")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the toy recipe's")
    parser.add_argument("--discriminator-prompts", type=int, default=1024)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="reuse finished runs under outputs/bench_rlad/")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    options = parser.parse_args(argv)

    set_up_process()
    import torch

    from trl_opd import testbed

    prepared = snapshot(testbed.prepare(options.setting, seed=options.testbed_seed))
    baseline = testbed.heldout_accuracies(prepared)
    WORK.mkdir(parents=True, exist_ok=True)
    anchor_path, discriminator = WORK / "anchor.pt", None
    if any(method.endswith("_aapa") for method in options.methods):
        discriminator = train_discriminator(prepared, options.discriminator_prompts, anchor_path)
        print("discriminator", json.dumps(discriminator), flush=True)
    overrides = {} if options.learning_rate is None else {"learning_rate": options.learning_rate}
    steps = options.steps or recipe_settings()["max_steps"]
    jobs = [
        dict(
            setting=options.setting,
            prepared=prepared,
            seed=seed,
            method=method,
            steps=steps,
            eval_every=options.eval_every,
            overrides=overrides,
            anchor_path=str(anchor_path),
            student_accuracy=baseline["student"],
            resume=options.resume,
            tag=options.tag,
        )
        for seed in options.seeds
        for method in options.methods
    ]
    with ProcessPoolExecutor(options.jobs, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(run_cached, jobs))

    record = {
        "command": "python " + " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "hardware": f"{os.cpu_count()}-core CPU (shared), torch {torch.__version__}, 1 thread per run",
        "task": str(prepared["task"]),
        "checkpoints": {role: str(prepared[role]) for role in ("teacher", "student")},
        "settings": {**recipe_settings(), **overrides, "max_steps": steps},
        "baseline": baseline,
        "discriminator": discriminator,
        "results": results,
    }
    stem = RESULTS / f"rlad_{options.setting}{options.tag}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    stem.with_suffix(".md").write_text(
        f"# RLAD vs GRPO on the testbed ({options.setting})\n\n`{record['command']}` "
        f"on {record['hardware']}.\n\n" + summarise(record)
    )
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
