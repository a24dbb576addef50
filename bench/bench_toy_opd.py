"""Toy OPD against its controls on the testbed, several seeds, one run.

Methods, all from the same cached teacher and the same cold-started student, same prompts, steps, batch and
learning rate (testbed.md: lr 1e-3 constant, batch 32, T = 1):

* `opd`            trl_opd.OPDTrainer, reverse KL on student samples (the toy recipe)
* `trl_distill`    trl.DistillationTrainer, beta = 1 (TRL's own on-policy distillation)
* `sft_teacher`    off-policy control: SFT (next-token NLL) on fresh teacher samples, same number of samples
* `seqkd_fkl`      off-policy, full distribution: OPDTrainer with lmbda = 0, seq_kd, forward KL on teacher samples
                   (separates "on-policy sampling" from "the teacher's full distribution as target")

The distillation seed (sampling, data order) varies; the teacher and student checkpoints are fixed (testbed.md:
most spread comes from the student's init, so fix it for method comparisons and report paired differences).

    python bench/bench_toy_opd.py --setting multistrategy --seeds 0 1 2 --workers 2
Writes bench/results/toy_opd_<setting>.json and .md.
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
METHODS = ("opd", "trl_distill", "sft_teacher", "seqkd_fkl")


def common_args(output_dir: str, seed: int, steps: int) -> dict:
    return dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=32, learning_rate=1e-3,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, seed=seed, use_cpu=True, bf16=False,
        gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=50, disable_tqdm=True,
    )


def teacher_samples(teacher, tokenizer, prompts: list[str], max_new_tokens: int, seed: int) -> list[str]:
    """Fresh teacher samples at T = 1 (the off-policy control's data), in large batches."""
    import torch

    torch.manual_seed(seed)
    completions = []
    for start in range(0, len(prompts), 512):
        batch = tokenizer(prompts[start : start + 512], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            output = teacher.generate(**batch, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                      max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id)
        completions += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return completions


def train(method: str, student, teacher, tokenizer, data, seed: int, steps: int, output_dir: str):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer, SFTConfig, SFTTrainer

    from trl_opd import OPDConfig, OPDTrainer

    args = common_args(output_dir, seed, steps)
    if method == "opd":
        return OPDTrainer(student, teacher, args=OPDConfig(divergence="reverse_kl", max_completion_length=40, **args),
                          train_dataset=data, processing_class=tokenizer)
    if method == "trl_distill":
        return DistillationTrainer(student, teacher, args=DistillationConfig(beta=1.0, max_completion_length=40, **args),
                                   train_dataset=data, processing_class=tokenizer)
    if method == "seqkd_fkl":
        return OPDTrainer(student, teacher, args=OPDConfig(divergence="forward_kl", lmbda=0.0, seq_kd=True,
                                                           max_completion_length=40, **args),
                          train_dataset=data, processing_class=tokenizer)
    if method == "sft_teacher":
        prompts = list(data["prompt"])[: steps * 32]
        completions = teacher_samples(teacher, tokenizer, prompts, 40, seed)
        sft_data = Dataset.from_dict({"prompt": prompts, "completion": completions})
        return SFTTrainer(student, args=SFTConfig(completion_only_loss=True, **args), train_dataset=sft_data,
                          processing_class=tokenizer)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def run_one(job: dict) -> dict:
    """One (method, seed): a fresh student copy, train, held-out accuracy. Runs in a worker process."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl_opd import testbed
    from trl_opd.testbed.training import load_pretrained

    prepared = testbed.prepare(job["setting"], seed=job["testbed_seed"], show_progress=False)
    teacher, tokenizer = load_pretrained(prepared["teacher"])
    student, _ = load_pretrained(prepared["student"])
    student.train()
    data = testbed.make_dataset(job["steps"] * 32, prepared["task"], seed=job["seed"])
    heldout = testbed.heldout_problems(prepared["task"])
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = train(job["method"], student, teacher, tokenizer, data, job["seed"], job["steps"], output_dir)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    score, records = testbed.accuracy(trainer.model, tokenizer, heldout, return_records=True)
    result = {**job, "accuracy": score, "train_seconds": seconds}
    if job["setting"] == "multistrategy":
        result["strategy"] = testbed.strategy_summary(records)
    print(json.dumps({k: v for k, v in result.items() if k != "strategy"}), flush=True)
    return result


def summarise(results: list[dict], baseline: dict) -> str:
    lines = [f"Teacher {100 * baseline['teacher']:.1f}%, student before {100 * baseline['student']:.1f}% "
             f"(300 held-out problems, greedy).", "",
             "| method | " + " | ".join(f"seed {s}" for s in sorted({r['seed'] for r in results}))
             + " | mean ± sd | gap recovered | train s/run |", "|---|" + "---|" * (len({r['seed'] for r in results}) + 3)]
    for method in METHODS:
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["seed"])
        if not rows:
            continue
        scores = [100 * r["accuracy"] for r in rows]
        mean = statistics.mean(scores)
        sd = statistics.pstdev(scores)
        gap = (mean / 100 - baseline["student"]) / (baseline["teacher"] - baseline["student"])
        seconds = statistics.mean(r["train_seconds"] for r in rows)
        lines.append(f"| {method} | " + " | ".join(f"{s:.1f}" for s in scores)
                     + f" | {mean:.1f} ± {sd:.1f} | {gap:.2f} | {seconds:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="multistrategy")
    parser.add_argument("--testbed-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--workers", type=int, default=2)
    options = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from trl_opd import testbed

    prepared = testbed.prepare(options.setting, seed=options.testbed_seed)
    baseline = testbed.heldout_accuracies(prepared)
    jobs = [dict(setting=options.setting, testbed_seed=options.testbed_seed, seed=seed, steps=options.steps,
                 method=method) for seed in options.seeds for method in options.methods]
    with ProcessPoolExecutor(options.workers) as pool:
        results = list(pool.map(run_one, jobs))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"toy_opd_{options.setting}"
    record = {"command": "python " + " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "hardware": f"{os.cpu_count()}-core CPU, torch {torch.__version__}, 1 thread per run",
              "baseline": baseline, "results": results}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2))
    stem.with_suffix(".md").write_text(f"# Toy OPD vs controls ({options.setting})\n\n`{record['command']}` on "
                                       f"{record['hardware']}.\n\n" + summarise(results, baseline))
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
