r"""MOPD on the testbed (issue 15 item 2): a teacher per domain, each row scored by its own domain's teacher.

Domains of the main task (2 operations, 2-digit operands):

* `add`  chains with only `+`: the task `TaskConfig(allow_subtraction=False)`; held-out = its 300 held-out problems.
* `sub`  chains with at least one `-`: the main task `TaskConfig()` filtered to prompts holding a `-`; held-out = the
         main task's held-out problems with a `-` (the main task's reserved prompts stay out of every training set).

Checkpoints (cached under ~/.cache/trl_opd/mopd, keys that cannot meet the testbed's own):

* teacher `add` / teacher `sub`: the testbed teacher's model (2 layers / 96 / 4 heads) and SFT recipe (`TrainSpec()`:
  up to 2,000 steps of batch 64, lr 3e-3 cosine, stop at 98% validation accuracy), trained on one domain only and
  early-stopped on that domain's validation problems.
* student: the main setting's testbed student (`build_student(TaskConfig())`: 2 / 64 / 2, cold-started on the mixed
  task until the first validation evaluation >= 15%).

OPD conditions (the testbed's distillation settings, `distillation_args`: batch 32, lr 1e-3 constant, T = 1, 40
completion tokens; reverse KL; training prompts alternate the two domains, 50/50; `teacher_id` = the row's domain):

* `routed`      teachers={"add": teacher add, "sub": teacher sub}
* `add_teacher` teachers={"add": teacher add, "sub": teacher add}   (teacher add alone on every row)
* `sub_teacher` teachers={"add": teacher sub, "sub": teacher sub}   (teacher sub alone on every row)

The single-teacher conditions route both domains to one checkpoint: that trains exactly like the single teacher
(tests/test_teachers.py::test_two_copies_of_one_teacher_train_like_that_teacher) and logs the divergence per domain.

    python bench/bench_mopd.py --seeds 0 1 2 --steps 300 --workers 2

Writes bench/results/mopd_testbed.{json,md} (or --out STEM).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path.home() / ".cache" / "trl_opd" / "mopd"
DOMAINS = ("add", "sub")
CONDITIONS = {"routed": {"add": "add", "sub": "sub"}, "add_teacher": {"add": "add", "sub": "add"},
              "sub_teacher": {"add": "sub", "sub": "sub"}}  # condition -> {domain: whose teacher scores its rows}
OPD_PROMPT_SEED = 100  # the OPD prompts' stream seed is this + the run's seed (the checkpoints' SFT streams use 0)
WINDOW = 25  # steps averaged for the "first" / "last" per-teacher metrics


def _tasks():
    from trl_opd.testbed import TaskConfig

    return {"add": TaskConfig(allow_subtraction=False), "sub": TaskConfig()}


def _in_domain(domain: str, problem: dict) -> bool:
    return domain == "add" or "-" in problem["prompt"]


def domain_problems(domain: str, split: str) -> list[dict]:
    """The domain's held-out ("heldout") or validation ("validation") problems."""
    from trl_opd.testbed import heldout_problems, validation_problems

    reserved = {"heldout": heldout_problems, "validation": validation_problems}[split](_tasks()[domain])
    return [p for p in reserved if _in_domain(domain, p)]


def domain_rows(domain: str, n: int, seed: int) -> list[dict]:
    """The first `n` training problems of the domain's stream (its task's reserved prompts excluded)."""
    from trl_opd.testbed.task import iter_problems

    stream = (p for p in iter_problems(_tasks()[domain], seed) if _in_domain(domain, p))
    return [{**p, "domain": domain} for p in itertools.islice(stream, n)]


def build_domain_teacher(domain: str, seed: int = 0) -> str:
    """The testbed teacher's model and SFT recipe trained on one domain (cached)."""
    from trl_opd.testbed import ModelSpec, TrainSpec
    from trl_opd.testbed.task import derive_seed
    from trl_opd.testbed.training import CACHE_VERSION, build_cache_entry

    model, training = ModelSpec.for_role("teacher"), TrainSpec()
    key = f"{derive_seed('mopd-domain-teacher', domain, asdict(model), asdict(training), seed, CACHE_VERSION):016x}"

    def complete(entry: Path) -> bool:
        try:
            return json.loads((entry / "mopd.json").read_text())["key"] == key
        except (OSError, ValueError, KeyError):
            return False

    def write(staging: Path) -> None:
        from datasets import Dataset

        from trl_opd.testbed import char_tokenizer, sft
        from trl_opd.testbed.models import config_from_spec, tiny_model

        tokenizer = char_tokenizer()
        teacher = tiny_model(tokenizer, config_from_spec(model, tokenizer), seed=seed)
        data = Dataset.from_list(domain_rows(domain, training.steps * training.batch_size, seed))
        result = sft(teacher, tokenizer, data, steps=training.steps, batch_size=training.batch_size,
                     learning_rate=training.learning_rate, warmup_steps=training.warmup_steps,
                     eval_problems=domain_problems(domain, "validation"), eval_every=training.eval_every,
                     target_accuracy=training.target_accuracy, seed=seed, show_progress=False)
        teacher.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "mopd.json").write_text(json.dumps(
            {"key": key, "domain": domain, "model": asdict(model), "training": asdict(training), "seed": seed,
             "steps": result.steps, "reached_target": result.reached_target, "wall_time_s": round(result.wall_time_s),
             "validation_history": result.evaluations}, indent=2))

    return build_cache_entry(CACHE / f"teacher-{domain}-{key}", complete, write)


def build_checkpoint(name: str) -> str:
    """`name` in ("add", "sub", "student"): its cached directory (built first if missing). Runs in a worker."""
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    if name == "student":
        from trl_opd.testbed import build_student

        path = build_student(_tasks()["sub"], cache_dir=CACHE, show_progress=False)  # the main task's student
    else:
        path = build_domain_teacher(name)
    print(f"[{time.strftime('%H:%M:%S')}] checkpoint {name}: {path} ({time.perf_counter() - start:.0f} s)", flush=True)
    return path


def domain_accuracies(path_or_model, tokenizer=None) -> dict:
    """Greedy held-out accuracy per domain and their mean ("overall": both domains weigh alike, as in training)."""
    from trl_opd.testbed import accuracy, load_pretrained

    model = path_or_model
    if isinstance(path_or_model, str):
        model, tokenizer = load_pretrained(path_or_model)
    scores = {domain: accuracy(model, tokenizer, domain_problems(domain, "heldout")) for domain in DOMAINS}
    return {**scores, "overall": statistics.mean(scores.values())}


def opd_dataset(steps: int, seed: int):
    """`steps * 32` training prompts alternating the domains, `teacher_id` = the row's domain."""
    from datasets import Dataset

    half = steps * 32 // 2
    rows = [row for pair in zip(*(domain_rows(d, half, OPD_PROMPT_SEED + seed) for d in DOMAINS)) for row in pair]
    return Dataset.from_list([{**row, "teacher_id": row["domain"]} for row in rows])


def _window_mean(log: list[dict], key: str, entries: slice) -> float:
    values = [entry[key] for entry in log if key in entry]
    return statistics.mean(values[entries])


def run_one(job: dict) -> dict:
    """One (condition, seed): a fresh copy of the student, OPD, held-out accuracy per domain. Runs in a worker."""
    import torch

    torch.set_num_threads(1)
    from transformers import PrinterCallback

    from trl_opd import OPDConfig, OPDTrainer, testbed
    from trl_opd.testbed import load_pretrained

    student, tokenizer = load_pretrained(job["paths"]["student"])
    student.train()
    teachers = {domain: {"teacher_model_name_or_path": job["paths"][owner]}
                for domain, owner in CONDITIONS[job["condition"]].items()}
    with tempfile.TemporaryDirectory() as output_dir:
        args = OPDConfig(**testbed.distillation_args(output_dir, job["seed"], job["steps"], logging_steps=1),
                         divergence="reverse_kl", teachers=teachers)
        trainer = OPDTrainer(student, args=args, train_dataset=opd_dataset(job["steps"], job["seed"]),
                             processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # a log line per step would bury the per-run lines
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    log = trainer.state.log_history
    metrics = {}
    for domain in DOMAINS:
        for what in ("divergence", "token_share"):
            key = f"teachers/{domain}/{what}"
            metrics[key] = {"first_step": _window_mean(log, key, slice(0, 1)),
                            "last_step": _window_mean(log, key, slice(-1, None)),
                            f"first_{WINDOW}": _window_mean(log, key, slice(0, WINDOW)),
                            f"last_{WINDOW}": _window_mean(log, key, slice(-WINDOW, None))}
    result = {"condition": job["condition"], "seed": job["seed"], "steps": job["steps"],
              "accuracy": domain_accuracies(trainer.model, tokenizer), "train_seconds": round(seconds, 1),
              "metrics": metrics}
    print(f"[{time.strftime('%H:%M:%S')}] {job['condition']} seed {job['seed']}: "
          + ", ".join(f"{k} {100 * v:.1f}%" for k, v in result["accuracy"].items()) + f" ({seconds:.0f} s)", flush=True)
    return result


def _mean_sd(values, scale: float = 100.0, digits: int = 1) -> str:
    values = [scale * v for v in values]
    return f"{statistics.mean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def design(record: dict) -> str:
    """The setup as run, from the record."""
    held, base = record["heldout_sizes"], record["checkpoints"]

    def sft_line(name: str) -> str:
        info = base[name]["training"]
        return (f"{info['steps']} SFT steps (batch 64), {'stopped at' if info['reached_target'] else 'did not reach'} "
                f"the {100 * info['training']['target_accuracy']:.0f}% validation target, "
                f"{info['wall_time_s']:.0f} s wall")

    return "\n".join([
        "## Design", "",
        (f"* Domains of the main task (2 operations, 2-digit operands): **add** = `TaskConfig(allow_subtraction=False)` "
        f"(only `+`); **sub** = `TaskConfig()` problems whose prompt holds at least one `-`. Held-out: add = its task's "
        f"{held['add']} held-out problems; sub = the {held['sub']} of the main task's 300 held-out problems that hold a "
        "`-`. Every training stream (teachers' SFT, OPD prompts) excludes its task's held-out and validation prompts, so "
        "no held-out prompt is trained on (a `+`-only prompt never meets a sub held-out prompt and vice versa)."),
        (f"* Teacher **add** / teacher **sub**: the testbed teacher (2 layers, hidden 96, 4 heads, char tokenizer) and "
        f"its SFT recipe (`TrainSpec()`: at most 2,000 steps of batch 64, lr 3e-3 cosine, stop at 98% on the "
        f"domain's validation problems), trained on its domain only. add: {sft_line('add')}; sub: {sft_line('sub')}."),
        (f"* Student: the main setting's testbed student (`build_student(TaskConfig())`: 2 layers, hidden 64, 2 heads, "
        f"cold-started on the mixed main task until the first validation evaluation >= 15%): "
        f"{base['student']['training']['steps']} SFT steps."),
        ("* OPD: `OPDTrainer` with `testbed.distillation_args` (batch 32, lr 1e-3 constant, T = 1, at most 40 "
        f"completion tokens, CPU), reverse KL, {record['steps']} steps, `logging_steps=1`. Prompts: "
        f"{record['steps'] * 32} rows alternating add and sub (50/50), drawn from stream seed "
        f"{record['opd_prompt_seed']}; `teacher_id` = the row's domain. Conditions (`teachers=`): **routed** = "
        "{add: teacher add, sub: teacher sub}; **add_teacher** = teacher add on both domains; **sub_teacher** = teacher "
        "sub on both domains (one checkpoint behind both names trains exactly like that teacher alone, "
        "tests/test_teachers.py, and still logs the divergence per domain)."),
        ("* Evaluation: greedy held-out accuracy per domain; overall = the mean of the two domains (they weigh alike, "
        "as in training). sd = population sd over the seeds (distillation seed: sampling and data order; the "
        "checkpoints are fixed)."), ""])


def summarise(record: dict) -> str:
    results, base = record["results"], record["checkpoints"]
    held = record["heldout_sizes"]
    lines = [design(record), "## Checkpoints (greedy held-out accuracy, %)", "",
             f"| model | add ({held['add']} problems) | sub ({held['sub']} problems) | overall (mean of domains) |",
             "|---|---|---|---|"]
    for name in ("add", "sub", "student"):
        acc = base[name]["accuracy"]
        label = {"add": "teacher add", "sub": "teacher sub", "student": "student before OPD"}[name]
        lines.append(f"| {label} | " + " | ".join(f"{100 * acc[k]:.1f}" for k in (*DOMAINS, "overall")) + " |")
    seeds = sorted({r["seed"] for r in results})
    lines += ["", (f"## Student after {record['steps']} OPD steps (held-out accuracy, %, mean ± sd over seeds "
              f"{', '.join(map(str, seeds))}; population sd)"), "",
              "| condition | add | sub | overall | add per seed | sub per seed | train s/run |", "|---|---|---|---|---|---|---|"]
    for condition in CONDITIONS:
        rows = sorted((r for r in results if r["condition"] == condition), key=lambda r: r["seed"])
        if not rows:
            continue
        cells = [_mean_sd([r["accuracy"][k] for r in rows]) for k in (*DOMAINS, "overall")]
        per_seed = [", ".join(f"{100 * r['accuracy'][d]:.1f}" for r in rows) for d in DOMAINS]
        lines.append(f"| {condition} | " + " | ".join(cells + per_seed)
                     + f" | {statistics.mean(r['train_seconds'] for r in rows):.0f} |")
    routed = {r["seed"]: r for r in results if r["condition"] == "routed"}
    if routed:
        lines += ["", "Paired differences, routed − single teacher (same seed: same prompts and data order), points:", "",
                  "| vs | domain | per seed | mean ± sd |", "|---|---|---|---|"]
        for condition in CONDITIONS:
            rows = sorted((r for r in results if r["condition"] == condition and r["seed"] in routed),
                          key=lambda r: r["seed"])
            for domain in (DOMAINS if condition != "routed" and rows else ()):
                diffs = [routed[r["seed"]]["accuracy"][domain] - r["accuracy"][domain] for r in rows]
                lines.append(f"| {condition} | {domain} | " + ", ".join(f"{100 * d:+.1f}" for d in diffs)
                             + f" | {_mean_sd(diffs)} |")
    lines += ["", (f"## Per-teacher metrics from the logs (`teachers/<domain>/divergence`: the reverse KL of the "
              f"rows of that domain against the teacher that scores them; mean ± sd over seeds; first/last step and "
              f"first/last {WINDOW}-step window means)"), "",
              "| condition | domain (teacher) | first step | last step | first window | last window | token share |",
              "|---|---|---|---|---|---|---|"]
    for condition, owners in CONDITIONS.items():
        rows = [r for r in results if r["condition"] == condition]
        if not rows:
            continue
        for domain in DOMAINS:
            div = [r["metrics"][f"teachers/{domain}/divergence"] for r in rows]
            share = [r["metrics"][f"teachers/{domain}/token_share"][f"last_{WINDOW}"] for r in rows]
            lines.append(f"| {condition} | {domain} (teacher {owners[domain]}) | "
                         + " | ".join(_mean_sd([d[k] for d in div], 1.0, 3)
                                      for k in ("first_step", "last_step", f"first_{WINDOW}", f"last_{WINDOW}"))
                         + f" | {_mean_sd(share, 1.0, 3)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "mopd_testbed"), help="results stem: writes STEM.json and .md")
    options = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    with ProcessPoolExecutor(options.workers) as pool:
        names = ("add", "sub", "student")
        paths = dict(zip(names, pool.map(build_checkpoint, names)))
        checkpoints = {name: {"path": path, "accuracy": domain_accuracies(path)} for name, path in paths.items()}
        for name, info in checkpoints.items():
            print(f"{name}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in info["accuracy"].items()), flush=True)
        jobs = [{"paths": paths, "condition": c, "seed": s, "steps": options.steps} for s in options.seeds
                for c in options.conditions]
        futures = [pool.submit(run_one, job) for job in jobs]
        results = []
        for done, future in enumerate(as_completed(futures), 1):
            results.append(future.result())
            print(f"  {done}/{len(jobs)} runs done, {time.perf_counter() - start:.0f} s elapsed", flush=True)
    for name in ("add", "sub"):
        checkpoints[name]["training"] = json.loads((Path(paths[name]) / "mopd.json").read_text())
    from trl_opd.testbed import read_metadata

    checkpoints["student"]["training"] = {k: v for k, v in read_metadata(paths["student"]).items() if k != "key"}
    command = "python bench/" + " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    record = {"command": command, "steps": options.steps, "wall_seconds": round(time.perf_counter() - start),
              "hardware": f"{os.cpu_count()}-core CPU (shared), torch {torch.__version__}, 1 thread per process, "
                          f"{options.workers} workers",
              "heldout_sizes": {d: len(domain_problems(d, "heldout")) for d in DOMAINS},
              "opd_prompt_seed": f"{OPD_PROMPT_SEED} + seed", "checkpoints": checkpoints, "results": results}
    stem = Path(options.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2))
    write_report(record, stem)
    print(stem.with_suffix(".md").read_text())
    return 0


def write_report(record: dict, stem: Path) -> None:
    """STEM.md from a record (also from a saved STEM.json, e.g. after adding its hand-written "conclusion")."""
    stem.with_suffix(".md").write_text(
        f"# MOPD on the testbed: a teacher per domain ({record['steps']} OPD steps)\n\n`{record['command']}` on "
        f"{record['hardware']}; {record['wall_seconds']} s wall for the whole command.\n\n" + summarise(record)
        + (f"\n## Conclusion\n\n{record['conclusion']}\n" if record.get("conclusion") else ""))


if __name__ == "__main__":
    raise SystemExit(main())
