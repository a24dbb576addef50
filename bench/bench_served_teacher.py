"""Served teacher vs local teacher (issue 15 item 5): trainer-process memory and step time, and testbed accuracy of
the served top-k signal against local full-vocabulary OPD.

Two parts, each merged into bench/results/served_teacher_cpu.{json,md} (run one, the other's figures stay):

* `efficiency`: per shape, in one invocation, `OPDTrainer` with (a) the teacher loaded locally, (b) the same weights
  served by vLLM's OpenAI-compatible server (CPU build, `.venv-vllm`) and (c) served by trl_opd's own server
  (`trl-opd serve-teacher`). All three read the same support: the teacher's top-20 with the tail
  (`loss_top_k=20, loss_top_k_source="teacher", loss_top_k_tail=True`), so only the teacher's location differs.
  Each variant trains twice, each time in a fresh subprocess with one torch thread: a timed pass (median step time
  over the steps after warm-up: wall, the trainer process's CPU, and the servers' CPU consumed during the step) and
  a memory pass (glibc told to return freed blocks; the process's resident-set high-water mark, `VmHWM` =
  `ru_maxrss`, after training). Every variant's timed pass runs before the memory passes. The servers run in
  their own processes (both stay up for the whole shape; their CPU during the local run shows what they cost idle);
  their resident sets are reported apart. Shapes: `testbed` (the testbed's character tokenizer, 101 tokens;
  student 2 layers / 64 / 2 heads; teacher 2 layers / 96 / 4 heads with head_dim 32 instead of 24, because vLLM's
  CPU attention needs a multiple of 32; batch 32, 40 completion tokens, as the testbed's OPD) and `4x` (the Qwen3
  tokenizer, 151,669 tokens; the same student; teacher 4 layers / 256 / 8 heads of 32, 4.4x the student's
  parameters; batch 8, 32 completion tokens).
  Random weights; every rollout has exactly the completion length (`min_new_tokens`).
* `accuracy`: the multistrategy testbed (the README's toy OPD: the shipped teacher and student, the distillation seed
  varies), `testbed.distillation_args` (batch 32, lr 1e-3 constant, T = 1, 40 tokens), 300 steps: local
  full-vocabulary reverse KL (OPD's default) against reverse KL on the teacher's top-20 with the tail. The testbed
  teacher has head_dim 24, which vLLM's CPU build cannot serve; tests/test_vllm_teacher.py shows a vLLM-served teacher
  gives the local teacher's steps (same top-k settings) to ~1e-6, so the top-k arm runs with the teacher loaded
  locally. `--served-seeds` adds the top-k arm with the teacher served by trl_opd's server (`teacher_server_backend=
  "trl_opd"`) for those seeds.
* `support`: where the two arms' objectives differ, on student samples before distillation: the teacher's top-20
  mass, the student's mass outside it, and the full against the top-20 + tail reverse KL (value, gradient cosine).

    python bench/bench_served_teacher.py efficiency --shapes testbed 4x --steps 8 --warmup 2
    python bench/bench_served_teacher.py accuracy --seeds 0 1 2 --served-seeds 0 --workers 2
    python bench/bench_served_teacher.py support
    python bench/bench_served_teacher.py render           # rewrite the Markdown from the JSON

The JSON's `notes` (the Markdown's "Reading") are written by hand after a run and kept when a part is re-run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "tests"))  # tests/servers.py: start and stop real vLLM / trl_opd servers

from bench_trainers import _status_kib, code_version

RESULTS = BENCH / "results"
STEM = RESULTS / "served_teacher_cpu"
VARIANTS = ("local", "vllm", "trl_opd")
TOP_K = {"loss_top_k": 20, "loss_top_k_source": "teacher", "loss_top_k_tail": True}
SHAPES = {
    "testbed": dict(tokenizer="testbed_char", student=dict(hidden=64, layers=2, heads=2),
                    teacher=dict(hidden=96, layers=2, heads=4), teacher_head_dim=32, batch=32, completion=40),
    "4x": dict(tokenizer="qwen3", student=dict(hidden=64, layers=2, heads=2),
               teacher=dict(hidden=256, layers=4, heads=8), teacher_head_dim=None, batch=8, completion=32),
}
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
       "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------- efficiency: models


def shape_tokenizer(name: str):
    if name == "qwen3":
        from bench_trainers import load_tokenizer

        return load_tokenizer()
    from trl_opd import testbed

    return testbed.task_tokenizer("char", testbed.SETTINGS["multistrategy"].task)


def shape_prompts(shape: str, tokenizer, rows: int = 512):
    if SHAPES[shape]["tokenizer"] == "qwen3":
        from bench_trainers import dataset

        return dataset(tokenizer, rows).select_columns(["prompt"])
    from trl_opd import testbed

    return testbed.make_dataset(rows, testbed.SETTINGS["multistrategy"].task, seed=0).select_columns(["prompt"])


def save_models(shape: str, directory: Path) -> dict:
    """Random-weight student and teacher of `shape` saved (with the tokenizer) under `directory`; their sizes."""
    from trl_opd.testbed.models import ModelSpec, config_from_spec, tiny_model

    spec, tokenizer = SHAPES[shape], shape_tokenizer(SHAPES[shape]["tokenizer"])
    sizes = {}
    for role, seed in (("student", 0), ("teacher", 1)):
        config = config_from_spec(ModelSpec(**spec[role]), tokenizer)
        config.max_position_embeddings = 512
        if role == "teacher" and spec["teacher_head_dim"]:
            config.head_dim = spec["teacher_head_dim"]
        model = tiny_model(tokenizer, config=config, seed=seed)
        model.save_pretrained(directory / role)
        tokenizer.save_pretrained(directory / role)
        sizes[role] = {"parameters": sum(p.numel() for p in model.parameters()), "hidden": config.hidden_size,
                       "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
                       "head_dim": config.head_dim, "vocab": config.vocab_size}
    sizes["teacher_over_student_parameters"] = round(sizes["teacher"]["parameters"] / sizes["student"]["parameters"], 2)
    return sizes


# ------------------------------------------------------------------------------------------- efficiency: one variant


def tree_cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds of each server process and all its descendants (vLLM's engine core is a child)."""
    import psutil

    out = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            total = 0.0
            for process in [root, *root.children(recursive=True)]:
                times = process.cpu_times()
                total += times.user + times.system
            out[pid] = total
        except psutil.Error:
            out[pid] = float("nan")
    return out


def tree_memory_gb(pid: int) -> dict:
    """Resident set now and the sum of the processes' high-water marks (an upper bound on the tree's peak)."""
    import psutil

    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    hwm = 0
    for process in processes:
        with open(f"/proc/{process.pid}/status") as status:
            hwm += next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    return {"processes": len(processes), "rss_gb": sum(p.memory_info().rss for p in processes) / 1024**3,
            "hwm_sum_gb": hwm / 1024**2}


def child(opts) -> None:
    """One variant alone in this process: per-step times, then the process's peak resident set."""
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_opd import OPDConfig, OPDTrainer

    imports_gb = _status_kib("VmRSS") / 1024**2
    directory, spec = Path(opts.model_dir), SHAPES[opts.shape]
    tokenizer = AutoTokenizer.from_pretrained(directory / "student")
    student = AutoModelForCausalLM.from_pretrained(directory / "student", dtype=torch.float32)
    prompts = shape_prompts(opts.shape, tokenizer)
    servers = [int(pid) for pid in opts.server_pids.split(",") if pid]
    if opts.child == "local":
        teacher = {"teacher_model_name_or_path": str(directory / "teacher")}
    else:
        teacher = {"teacher_model_server_url": opts.url, "teacher_server_backend": opts.child}
    steps = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = (time.perf_counter(), time.process_time(), tree_cpu_seconds(servers))

        def on_step_end(self, args, state, control, **kwargs):
            wall, cpu, server = time.perf_counter(), time.process_time(), tree_cpu_seconds(servers)
            steps.append({"wall_s": wall - self.start[0], "trainer_cpu_s": cpu - self.start[1],
                          "server_cpu_s": {str(pid): server[pid] - self.start[2][pid] for pid in servers},
                          "rss_gb": _status_kib("VmRSS") / 1024**2})

    with tempfile.TemporaryDirectory() as output_dir:
        args = OPDConfig(
            output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
            logging_steps=10**6, disable_tqdm=True, gradient_checkpointing=False, seed=0,
            per_device_train_batch_size=spec["batch"], learning_rate=1e-5, lr_scheduler_type="constant",
            max_steps=opts.warmup + opts.steps, temperature=1.0, max_completion_length=spec["completion"],
            generation_kwargs={"min_new_tokens": spec["completion"]}, dataloader_num_workers=0,
            **TOP_K, **teacher,
        )
        trainer = OPDTrainer(student, args=args, train_dataset=prompts, processing_class=tokenizer)
        loaded_gb = _status_kib("VmRSS") / 1024**2
        trainer.add_callback(Clock())
        trainer.train()
    losses = [entry["train_loss"] for entry in trainer.state.log_history if "train_loss" in entry]
    import resource

    print("RESULT " + json.dumps({
        "steps": steps, "imports_rss_gb": imports_gb, "after_trainer_init_rss_gb": loaded_gb,
        "process_peak_gb": _status_kib("VmHWM") / 1024**2,
        "ru_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "train_loss": losses[-1] if losses else None,
    }), flush=True)


def run_child(variant: str, shape: str, directory: Path, url: str | None, server_pids: list[int], *, steps: int,
              warmup: int, memory: bool) -> dict:
    """One variant in a fresh process. `memory`: glibc hands freed large blocks back at once (as bench_trainers'
    memory runs), so the high-water mark follows the live memory instead of the allocator's cache; it costs system
    time (page faults), so the timed pass runs without it."""
    command = [sys.executable, __file__, "efficiency", "--child", variant, "--shapes", shape, "--model-dir",
               str(directory), "--url", url or "", "--server-pids", ",".join(map(str, server_pids)),
               "--steps", str(steps), "--warmup", str(warmup)]
    env = {**os.environ, **ENV}
    if memory:
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in finished.stdout.splitlines() if line.startswith("RESULT ")]
    if finished.returncode != 0 or not lines:
        raise RuntimeError(f"{shape}/{variant} failed:\n{finished.stdout[-2000:]}\n{finished.stderr[-4000:]}")
    return {**json.loads(lines[-1][len("RESULT "):]), "subprocess_wall_s": round(time.perf_counter() - started, 1)}


def summarise_variant(timed: dict, memory: dict, warmup: int, server_names: dict) -> dict:
    """Medians of the timed pass's steps after warm-up; memory from the memory pass."""
    measured = timed["steps"][warmup:]
    median = lambda key: statistics.median(step[key] for step in measured)
    return {
        "step_wall_s": median("wall_s"), "step_trainer_cpu_s": median("trainer_cpu_s"),
        "step_server_cpu_s": {name: statistics.median(step["server_cpu_s"][pid] for step in measured)
                              for pid, name in server_names.items()},
        "train_loss": timed["train_loss"],
        **{key: memory[key] for key in ("imports_rss_gb", "after_trainer_init_rss_gb", "process_peak_gb",
                                        "ru_maxrss_gb")},
        "step_end_rss_gb": [round(step["rss_gb"], 4) for step in memory["steps"]],
        "time_pass": timed, "memory_pass": {k: v for k, v in memory.items() if k != "steps"},
    }


def efficiency(opts) -> dict:
    from servers import start_trl_opd_server, start_vllm, stop

    report = {}
    for shape in opts.shapes:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            sizes = save_models(shape, directory)
            servers, processes = {}, []
            try:
                t0 = time.perf_counter()
                servers["vllm"] = start_vllm(str(directory / "teacher"), directory / "vllm.log")
                vllm_start = time.perf_counter() - t0
                processes.append(servers["vllm"][1])
                servers["trl_opd"] = start_trl_opd_server(str(directory / "teacher"), directory / "trl_opd.log")
                processes.append(servers["trl_opd"][1])
                pids = [servers[name][1].pid for name in ("vllm", "trl_opd")]
                idle = tree_cpu_seconds(pids)
                time.sleep(10)
                idle_rate = {name: (after - idle[pid]) / 10 for name, pid, after in
                             zip(("vllm", "trl_opd"), pids, tree_cpu_seconds(pids).values())}
                passes = {False: {}, True: {}}
                for memory in (False, True):  # every variant's timed pass, then every variant's memory pass
                    for variant in opts.variants:
                        url = servers[variant][0] if variant != "local" else None
                        passes[memory][variant] = run_child(
                            variant, shape, directory, url, pids, warmup=opts.warmup, memory=memory,
                            steps=opts.memory_steps if memory else opts.steps)
                variants = {}
                for variant in opts.variants:
                    variants[variant] = summarise_variant(passes[False][variant], passes[True][variant], opts.warmup,
                                                          dict(zip(map(str, pids), ("vllm", "trl_opd"))))
                    v = variants[variant]
                    print(f"{shape}/{variant}: step {v['step_wall_s']:.3f} s wall, trainer CPU "
                          f"{v['step_trainer_cpu_s']:.3f} s, server CPU {v['step_server_cpu_s']}, peak "
                          f"{v['process_peak_gb']:.3f} GB", flush=True)
                server_memory = {name: tree_memory_gb(servers[name][1].pid) for name in ("vllm", "trl_opd")}
            finally:
                for process in processes:
                    stop(process)
        local = variants.get("local")
        ratios = {}
        if local:
            for variant in set(variants) - {"local"}:
                v = variants[variant]
                ratios[variant] = {
                    "process_peak": round(v["process_peak_gb"] / local["process_peak_gb"], 3),
                    "peak_above_imports": round((v["process_peak_gb"] - v["imports_rss_gb"])
                                                / (local["process_peak_gb"] - local["imports_rss_gb"]), 3),
                    "step_wall": round(v["step_wall_s"] / local["step_wall_s"], 3),
                    "step_trainer_cpu": round(v["step_trainer_cpu_s"] / local["step_trainer_cpu_s"], 3),
                    "step_trainer_plus_server_cpu": round(
                        (v["step_trainer_cpu_s"] + v["step_server_cpu_s"][variant]) / local["step_trainer_cpu_s"], 3),
                }
        report[shape] = {"shape": {k: v for k, v in SHAPES[shape].items() if k not in ("student", "teacher")},
                         "models": sizes, "vllm_start_s": round(vllm_start, 1), "server_idle_cpu_per_s": idle_rate,
                         "server_memory": server_memory, "variants": variants, "ratios_over_local": ratios,
                         "wall_s": round(time.perf_counter() - started, 1)}
        print(json.dumps({shape: ratios}), flush=True)
    return report


# ------------------------------------------------------------------------------------------- accuracy


ARMS = {"full_vocab": {}, "top20_tail": TOP_K, "top20_tail_served_trl_opd": TOP_K}


def run_accuracy_job(job: dict) -> dict:
    """One (arm, seed): the cached student, 300 OPD steps, held-out accuracy. Runs in a worker process."""
    import torch

    torch.set_num_threads(1)
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    from servers import start_trl_opd_server, stop

    from trl_opd import OPDConfig, OPDTrainer, testbed

    prepared = testbed.prepare(job["setting"], seed=0, show_progress=False)
    student, tokenizer = testbed.load_pretrained(prepared["student"])
    student.train()
    data = testbed.make_dataset(job["steps"] * 32, prepared["task"], seed=job["seed"])
    process = None
    with tempfile.TemporaryDirectory() as output_dir:
        teacher = {}
        if job["arm"].endswith("_served_trl_opd"):
            url, process = start_trl_opd_server(prepared["teacher"], Path(output_dir) / "server.log")
            teacher = {"teacher_model_server_url": url, "teacher_server_backend": "trl_opd"}
        try:
            args = OPDConfig(**testbed.distillation_args(output_dir, job["seed"], job["steps"], **ARMS[job["arm"]],
                                                         **teacher))
            local_teacher = None if teacher else testbed.load_pretrained(prepared["teacher"])[0]
            trainer = OPDTrainer(student, local_teacher, args=args, train_dataset=data, processing_class=tokenizer)
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
        finally:
            if process is not None:
                stop(process)
    score, records = testbed.accuracy(trainer.model, tokenizer, testbed.heldout_problems(prepared["task"]),
                                      return_records=True)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {**job, "accuracy": score, "train_seconds": round(seconds, 1), "logged_losses": losses,
              "strategy": testbed.strategy_summary(records)}
    print(json.dumps({k: v for k, v in result.items() if k not in ("strategy", "logged_losses")}), flush=True)
    return result


def accuracy(opts) -> dict:
    from concurrent.futures import ProcessPoolExecutor

    from trl_opd import testbed

    prepared = testbed.prepare(opts.setting, seed=0)
    baseline = testbed.heldout_accuracies(prepared)
    jobs = [dict(setting=opts.setting, seed=seed, steps=opts.steps, arm=arm)
            for seed in opts.seeds for arm in ("full_vocab", "top20_tail")]
    jobs += [dict(setting=opts.setting, seed=seed, steps=opts.steps, arm="top20_tail_served_trl_opd")
             for seed in opts.served_seeds]
    started = time.perf_counter()
    with ProcessPoolExecutor(opts.workers) as pool:
        results = list(pool.map(run_accuracy_job, jobs))
    return {"setting": opts.setting, "baseline": baseline, "steps": opts.steps, "workers": opts.workers,
            "teacher": prepared["teacher"], "student": prepared["student"], "results": results,
            "wall_s": round(time.perf_counter() - started, 1)}


def support(opts) -> dict:
    """Where the two arms' objectives differ: on student samples of the testbed student (before any distillation),
    the teacher's top-20 mass, the student's mass outside the teacher's top-20, and the full reverse KL against the
    top-20 + tail one (value and gradient w.r.t. the student's logits), per completion position."""
    import torch
    import torch.nn.functional as F

    from trl_opd import testbed
    from trl_opd.losses import per_token_divergence

    torch.set_num_threads(1)
    torch.manual_seed(0)
    prepared = testbed.prepare(opts.setting, seed=0, show_progress=False)
    teacher, tokenizer = testbed.load_pretrained(prepared["teacher"])
    student, _ = testbed.load_pretrained(prepared["student"])
    prompts = list(testbed.make_dataset(opts.support_rows, prepared["task"], seed=0)["prompt"])
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    width = batch["input_ids"].shape[1]
    with torch.no_grad():
        sequences = student.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=40,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        mask = (sequences != tokenizer.pad_token_id).long()
        logits = {role: model(sequences, attention_mask=mask).logits[:, width - 1:-1]
                  for role, model in (("teacher", teacher), ("student", student))}
    valid = sequences[:, width:] != tokenizer.pad_token_id
    teacher_logits, student_logits = logits["teacher"][valid], logits["student"][valid]
    top = teacher_logits.softmax(-1).topk(TOP_K["loss_top_k"])
    student_outside = 1 - student_logits.softmax(-1).gather(-1, top.indices).sum(-1)
    values, grads = {}, {}
    for name, options in (("full_vocab", {}), ("top20_tail", dict(top_k=TOP_K["loss_top_k"], top_k_source="teacher",
                                                                  top_k_tail=True))):
        leaf = student_logits.clone().requires_grad_(True)
        divergence = per_token_divergence(leaf, teacher_logits, divergence="reverse_kl", **options)
        divergence.sum().backward()
        values[name], grads[name] = divergence.detach(), leaf.grad
    per_position = F.cosine_similarity(grads["full_vocab"], grads["top20_tail"], dim=-1)
    outside = student_outside > 0.01
    return {
        "positions": int(valid.sum()), "vocab": teacher_logits.shape[-1], "rows": opts.support_rows,
        "teacher_top20_mass_min": top.values.sum(-1).min().item(),
        "teacher_top20_mass_median": top.values.sum(-1).median().item(),
        "student_mass_outside_mean": student_outside.mean().item(),
        "positions_student_outside_over_1pct": outside.float().mean().item(),
        "reverse_kl_mean": {name: value.mean().item() for name, value in values.items()},
        "reverse_kl_share_lost": 1 - (values["top20_tail"].sum() / values["full_vocab"].sum()).item(),
        "reverse_kl_share_lost_at_outside_positions": (
            (values["full_vocab"] - values["top20_tail"])[outside].sum() / (values["full_vocab"]
                                                                             - values["top20_tail"]).sum()).item(),
        "gradient_cosine_all": F.cosine_similarity(grads["full_vocab"].flatten(), grads["top20_tail"].flatten(),
                                                   dim=0).item(),
        "gradient_cosine_median": per_position.median().item(),
        "gradient_cosine_at_outside_positions_median": per_position[outside].median().item(),
        "gradient_norm_ratio": (grads["top20_tail"].norm() / grads["full_vocab"].norm()).item(),
    }


# ------------------------------------------------------------------------------------------- report


def environment() -> dict:
    import torch
    import transformers
    import trl

    probe = [str(ROOT / ".venv-vllm" / "bin" / "python"), "-c", "import vllm; print(vllm.__version__)"]
    vllm = subprocess.run(probe, capture_output=True, text=True, env={**os.environ, **ENV}, check=False)
    vllm = vllm.stdout.strip().splitlines()
    return {"cpu": f"{os.cpu_count()}-core CPU ({platform.machine()}), shared with another job",
            "load_average": os.getloadavg(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "vllm": vllm[-1] if vllm else None,
            "python": platform.python_version(), "trl_opd": code_version()}


def fmt_ratio(value) -> str:
    return "—" if value is None else f"{value:.2f}×"


def efficiency_markdown(part: dict) -> list[str]:
    lines = [f"## Efficiency (`{part['command']}`)", "", part["environment_note"], ""]
    for shape, r in part["shapes"].items():
        m = r["models"]
        lines += [
            f"### Shape `{shape}`",
            "",
            (f"Student {m['student']['layers']} layers / {m['student']['hidden']} wide ({m['student']['parameters']:,} "
            f"parameters), teacher {m['teacher']['layers']} / {m['teacher']['hidden']}, head_dim "
            f"{m['teacher']['head_dim']} ({m['teacher']['parameters']:,}: {m['teacher_over_student_parameters']}× the "
            f"student), vocabulary {m['teacher']['vocab']:,}; batch {r['shape']['batch']} × "
            f"{r['shape']['completion']} completion tokens; loss on the teacher's top-20 with the tail in all three. "
            f"Shape total {r['wall_s']:.0f} s (vLLM start {r['vllm_start_s']:.0f} s)."),
            "",
            ("| teacher | trainer peak RSS (GB) | above imports (GB) | step wall (s) | trainer CPU/step (s) | "
            "vLLM server CPU/step (s) | trl_opd server CPU/step (s) | final loss |"),
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, v in r["variants"].items():
            s = v["step_server_cpu_s"]
            lines.append(
                f"| {name} | {v['process_peak_gb']:.3f} | {v['process_peak_gb'] - v['imports_rss_gb']:.3f} | "
                f"{v['step_wall_s']:.3f} | {v['step_trainer_cpu_s']:.3f} | {s.get('vllm', 0):.3f} | "
                f"{s.get('trl_opd', 0):.3f} | {v['train_loss']:.4f} |")
        lines += ["", ("| served / local | process peak | peak above imports | step wall | trainer CPU/step | "
                  "(trainer + its server) CPU/step |"), "|---|---|---|---|---|---|"]
        for name, q in sorted(r["ratios_over_local"].items()):
            lines.append(f"| {name} | {fmt_ratio(q['process_peak'])} | {fmt_ratio(q['peak_above_imports'])} | "
                         f"{fmt_ratio(q['step_wall'])} | {fmt_ratio(q['step_trainer_cpu'])} | "
                         f"{fmt_ratio(q['step_trainer_plus_server_cpu'])} |")
        mem = r["server_memory"]
        idle = r["server_idle_cpu_per_s"]
        lines += ["", (f"Servers (own processes, after the runs): vLLM {mem['vllm']['rss_gb']:.2f} GB resident over "
                  f"{mem['vllm']['processes']} processes (sum of high-water marks {mem['vllm']['hwm_sum_gb']:.2f} GB), "
                  f"trl_opd {mem['trl_opd']['rss_gb']:.2f} GB ({mem['trl_opd']['hwm_sum_gb']:.2f} GB). Idle CPU "
                  f"before the runs: vLLM {idle['vllm']:.2f}, trl_opd {idle['trl_opd']:.2f} CPU-seconds per second."),
                  ""]
    return lines


def accuracy_markdown(part: dict) -> list[str]:
    base, results = part["baseline"], part["results"]
    seeds = sorted({r["seed"] for r in results})
    lines = [f"## Accuracy on the testbed (`{part['command']}`)", "",
             (f"Setting `{part['setting']}`, {part['steps']} steps, `testbed.distillation_args` (batch 32, lr 1e-3 "
             f"constant, T = 1, 40 completion tokens). Teacher {100 * base['teacher']:.1f}%, student before "
             f"{100 * base['student']:.1f}% (300 held-out problems, greedy). {part['workers']} runs at a time, "
             f"{part['wall_s'] / 60:.0f} min in all."), "",
             "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | train s/run |",
             "|---|" + "---|" * (len(seeds) + 2)]
    by_arm = {}
    for arm in ARMS:
        rows = {r["seed"]: r for r in results if r["arm"] == arm}
        if not rows:
            continue
        by_arm[arm] = rows
        scores = [100 * rows[s]["accuracy"] for s in sorted(rows)]
        spread = f"{statistics.mean(scores):.1f} ± {statistics.pstdev(scores):.1f}" if len(scores) > 1 else "—"
        lines.append(f"| {arm} | " + " | ".join(f"{100 * rows[s]['accuracy']:.1f}" if s in rows else "—"
                                                 for s in seeds)
                     + f" | {spread} | {statistics.mean(r['train_seconds'] for r in rows.values()):.0f} |")
    if {"full_vocab", "top20_tail"} <= set(by_arm):
        paired = [100 * (by_arm["top20_tail"][s]["accuracy"] - by_arm["full_vocab"][s]["accuracy"]) for s in seeds]
        lines += ["", "Paired top20_tail − full_vocab (points): " + ", ".join(f"{d:+.1f}" for d in paired)
                  + f"; mean {statistics.mean(paired):+.1f} ± {statistics.pstdev(paired):.1f}."]
    if {"top20_tail", "top20_tail_served_trl_opd"} <= set(by_arm):
        for seed, served in sorted(by_arm["top20_tail_served_trl_opd"].items()):
            local = by_arm["top20_tail"][seed]
            same = served["logged_losses"] == local["logged_losses"]
            lines.append(f"Seed {seed}, served by trl_opd's server vs loaded locally (same top-k loss): "
                         f"{100 * served['accuracy']:.1f}% vs {100 * local['accuracy']:.1f}%; the logged losses "
                         f"(every 25 steps) are {'identical' if same else 'different'}.")
    return lines + [""]


def environment_line(env: dict) -> str:
    return (f"{env['cpu']}, load average {', '.join(f'{x:.1f}' for x in env['load_average'])} at the start; torch "
            f"{env['torch']}, transformers {env['transformers']}, trl {env['trl']}, vLLM {env['vllm']} (CPU build, "
            f"own environment), Python {env['python']}; trl_opd {env['trl_opd']}.")


def support_markdown(part: dict) -> list[str]:
    return [f"### Where the arms' objectives differ (`{part['command']}`)", "",
            (f"{part['rows']} prompts, one T = 1 sample each from the testbed student before distillation, "
            f"{part['positions']} completion positions, vocabulary {part['vocab']}. The teacher's top-20 holds "
            f"≥ {100 * part['teacher_top20_mass_min']:.2f}% of its mass at every position (median "
            f"{100 * part['teacher_top20_mass_median']:.4f}%), but the student puts "
            f"{100 * part['student_mass_outside_mean']:.1f}% of its mass outside it on average (> 1% at "
            f"{100 * part['positions_student_outside_over_1pct']:.0f}% of the positions). Reverse KL per position: full vocabulary {part['reverse_kl_mean']['full_vocab']:.4f}, "
            f"top-20 + tail {part['reverse_kl_mean']['top20_tail']:.4f}: the tail bucket drops "
            f"{100 * part['reverse_kl_share_lost']:.0f}% of the divergence "
            f"({100 * part['reverse_kl_share_lost_at_outside_positions']:.0f}% of that at those positions). Gradient "
            f"w.r.t. the student's logits: cosine {part['gradient_cosine_all']:.3f} over all positions (per position: "
            f"median {part['gradient_cosine_median']:.4f}, {part['gradient_cosine_at_outside_positions_median']:.3f} "
            f"where the student is outside), norm ratio top-20/full {part['gradient_norm_ratio']:.2f}."), ""]


def render(report: dict) -> str:
    lines = ["# Served teacher vs local teacher (CPU)", ""]
    for name in ("efficiency", "accuracy", "support"):
        if name in report:
            lines.append(f"Hardware and versions of the {name} run: {environment_line(report[name]['environment'])}")
            lines.append("")
    if "efficiency" in report:
        lines += efficiency_markdown(report["efficiency"])
    if "accuracy" in report:
        lines += accuracy_markdown(report["accuracy"])
    if "support" in report:
        lines += support_markdown(report["support"])
    if report.get("notes"):
        lines += ["## Reading", ""] + [f"* {note}" for note in report["notes"]] + [""]
    return "\n".join(lines)


def save(report: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    STEM.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    STEM.with_suffix(".md").write_text(render(report))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("efficiency", "accuracy", "support", "render"))
    parser.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=4, help="efficiency: measured steps per variant")
    parser.add_argument("--memory-steps", type=int, default=2, help="efficiency: measured steps of the memory pass")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--setting", default="multistrategy", help="accuracy: testbed setting")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--served-seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--accuracy-steps", dest="accuracy_steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--support-rows", type=int, default=64, help="support: prompts sampled")
    parser.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--url", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--server-pids", default="", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    if opts.child:
        opts.shape = opts.shapes[0]
        child(opts)
        return
    report = json.loads(STEM.with_suffix(".json").read_text()) if STEM.with_suffix(".json").exists() else {}
    if opts.part != "render":
        command = "python " + " ".join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])])
        started = environment()
        if opts.part == "efficiency":
            part = {"command": command, "shapes": efficiency(opts), "steps": opts.steps, "warmup": opts.warmup}
            part["environment_note"] = (
                f"Each variant in fresh processes, one torch thread. Time: medians of {opts.steps} steps after "
                f"{opts.warmup} warm-up step(s); trainer CPU = the training process's CPU time (all its threads), "
                "server CPU = the server's process tree's CPU time during the same step. The servers share the "
                "2 cores with the trainer (and with another job): a served step's wall time includes the server's "
                "work, and wall times move with the machine's load; the CPU times are the steadier figures. Memory: "
                f"a second process per variant ({opts.warmup} + {opts.memory_steps} steps, glibc returning freed "
                "blocks), its resident-set high-water mark (Python, torch and the libraries included: 'above "
                "imports' subtracts the resident set after `import trl_opd`).")
        elif opts.part == "accuracy":
            opts.steps = opts.accuracy_steps
            part = accuracy(opts)
        else:
            part = support(opts)
        part["command"], part["environment"] = command, started
        report[opts.part] = part
    save(report)
    print(STEM.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
