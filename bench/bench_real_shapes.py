"""Start-up time and peak memory at real shapes: `OPDTrainer` (every switch off) against `trl.DistillationTrainer`.

Issue 18 measured OPDTrainer at 19.0 GiB peak RSS against 16.0 for TRL's trainer (Qwen3-0.6B student, Qwen3-1.7B
teacher) and a start-up of 47 s against 6 s. Both models are given by path, as users give them: Qwen3 configs from
`../shared/data/configs` with random weights saved in bfloat16 (as the real checkpoints are), the real Qwen3
tokenizer, 8 AIME 2024 problems as chat prompts, 16 completion tokens, batch 2, 2 steps, CPU.

    python bench/bench_real_shapes.py --teachers Qwen3-0.6B Qwen3-1.7B      # writes bench/results/real_shapes_cpu.*

Each (trainer, teacher) runs in a fresh subprocess, one at a time: start-up = the trainer's constructor (models
loaded, every check), peak RSS = the process's resident-set high-water mark after 2 steps (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results"


def model_dir(name: str, cache: Path) -> Path:
    """A random-weight bf16 checkpoint of the real config `name`, with the Qwen3 tokenizer (built once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = cache / name
    if (directory / "config.json").exists():
        return directory
    config = AutoConfig.from_pretrained(SHARED / "configs" / name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "qwen3").save_pretrained(directory)
    return directory


def prompts():
    from datasets import Dataset

    rows = [json.loads(line) for line in (SHARED / "math" / "aime24" / "test.jsonl").read_text().splitlines()[:8]]
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": row["problem"]}] for row in rows]})


# OPDTrainer with a method switched on (issue 18: "the same bench with TIP, top-k and OPRD").
METHODS = {
    "opd": {},
    "opd+tip": {"token_selection": "tip_soft_or", "token_ratio": 0.5},
    "opd+top_k": {"loss_top_k": 64},
    "opd+oprd": {"representation_weight": 0.01, "representation_layers": "last", "projector": "linear"},
}


def run_one(trainer_name: str, student: str, teacher: str) -> dict:
    """In this (fresh) process: build the trainer, train 2 steps; start-up seconds and peak RSS."""
    from trl import DistillationConfig, DistillationTrainer

    from trl_opd import OPDConfig, OPDTrainer

    config_class, trainer_class = (DistillationConfig, DistillationTrainer) if trainer_name == "trl" else \
        (OPDConfig, OPDTrainer)
    method = {} if trainer_name == "trl" else METHODS[trainer_name]
    args = config_class(**method, output_dir=f"/tmp/real-shapes-{trainer_name}", use_cpu=True, bf16=False, report_to="none",
                        save_strategy="no", gradient_checkpointing=False, max_steps=2, per_device_train_batch_size=2,
                        max_completion_length=16, learning_rate=1e-6, logging_steps=1, disable_tqdm=True, seed=0)
    dataset = prompts()
    started = time.perf_counter()
    trainer = trainer_class(student, teacher, args=args, train_dataset=dataset)
    startup = time.perf_counter() - started
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    teacher_dtype = str(next(trainer.accelerator.unwrap_model(trainer.teacher_model).parameters()).dtype)
    return {"startup_s": round(startup, 1), "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "losses": losses, "teacher_dtype": teacher_dtype}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teachers", nargs="+", default=["Qwen3-0.6B", "Qwen3-1.7B"])
    parser.add_argument("--student", default="Qwen3-0.6B")
    parser.add_argument("--methods", nargs="+", default=["opd"], choices=list(METHODS),
                        help="OPDTrainer variants measured after TRL's trainer, for each teacher")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "trl_opd" / "real-shapes"))
    parser.add_argument("--one", nargs=3, metavar=("TRAINER", "STUDENT", "TEACHER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one)))
        return
    cache = Path(args.cache)
    student = model_dir(args.student, cache)
    rows = []
    for teacher_name in args.teachers:
        teacher = model_dir(teacher_name, cache)
        for trainer_name in ("trl", *args.methods):
            command = [sys.executable, __file__, "--one", trainer_name, str(student), str(teacher)]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
            finished = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
            result = json.loads(finished.stdout.strip().splitlines()[-1])
            rows.append({"teacher": teacher_name, "trainer": trainer_name, **result})
            print(rows[-1], flush=True)
    write(rows, args)


def write(rows: list[dict], args) -> None:
    import torch
    import transformers
    import trl

    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python bench/bench_real_shapes.py --teachers " + " ".join(args.teachers)
            + " --methods " + " ".join(args.methods),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}}
    (RESULTS / "real_shapes_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# Start-up and peak memory at real shapes: OPDTrainer vs trl.DistillationTrainer", "",
             f"Command: `{meta['command']}`. Machine: {meta['machine']}; {meta['versions']}. Student "
             f"{args.student}, random bf16 weights, real Qwen3 tokenizer, 8 AIME 2024 chat prompts, 16 completion "
             "tokens, batch 2, 2 steps, CPU, each run in a fresh process.", "",
             "| teacher | trainer | start-up (s) | peak RSS (GiB) | teacher dtype | losses |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['teacher']} | {row['trainer']} | {row['startup_s']} | {row['peak_rss_gib']:.2f} | "
                     f"{row['teacher_dtype']} | {', '.join(f'{loss:.6f}' for loss in row['losses'])} |")
    lines += ["", "Ratios OPDTrainer / DistillationTrainer:", ""]
    for teacher in dict.fromkeys(row["teacher"] for row in rows):
        runs = {row["trainer"]: row for row in rows if row["teacher"] == teacher}
        for method in args.methods:
            lines.append(f"* {teacher} teacher, {method}: peak RSS "
                         f"{runs[method]['peak_rss_gib'] / runs['trl']['peak_rss_gib']:.2f}x, start-up "
                         f"{runs[method]['startup_s'] / max(runs['trl']['startup_s'], 0.1):.2f}x")
    (RESULTS / "real_shapes_cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
