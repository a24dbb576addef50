"""trl_opd's trainers against TRL's own, side by side: per-phase step time, tokens/s and peak memory as ratios.

Pairs (ours vs TRL's, the same models, dataset and settings on both sides):

* `opd_vs_distillation`: `OPDTrainer` (defaults: reverse KL, full vocabulary, fused chunked loss, lmbda = 1)
  vs `trl.DistillationTrainer` (beta = 1.0 = reverse KL, chunked divergence); on-policy, temperature 1.
* `opd_vs_gkd_offpolicy`: `OPDTrainer(lmbda=0)` vs `trl.experimental.gkd.GKDTrainer(lmbda=0)`: both train on the
  dataset's completions (no generation randomness); reverse KL (GKD beta = 1), temperature 1.
* `opd_vs_gkd_onpolicy`: the same with lmbda = 1 (student rollouts on both sides).
* `rlad_off_vs_grpo`: `RLADTrainer(rlad_alpha=1)` (RLAD switched off: trains like GRPO but still scores the teacher)
  vs `trl.GRPOTrainer`; `rlad_on_vs_grpo`: `rlad_alpha=0.5` (the paper's value).

Every rollout has exactly `--completion` tokens on both sides (`min_new_tokens` = max: random-initialised models
would otherwise stop at a random EOS), and the two students start from the same weights (one shared teacher).

**Time.** Both trainers of a pair live in one process and run their ordinary `train()` loops in two threads that
take strict turns, one optimizer step each (ours, TRL's, ours, TRL's, ...), so slow drifts of a shared machine hit
both alike. The first `--warmup` steps of each are dropped; the figures are medians over `--steps` measured steps.
Phases are timed by wrapping the trainers' own methods and modules (on CUDA with a synchronize at each boundary):

* `generation`: `_generate` (Distillation/OPD/GRPO/RLAD: prompt tokenisation, `generate`, decoding; for OPD with
  lmbda = 0 the tokenisation of the dataset completion) or GKD's `generate_on_policy_outputs`;
* `scoring`: the rest of `_generate_and_score_completions` (not GKD): padding, GRPO rewards and advantages, the
  LM heads of GRPO/RLAD's no-grad log-prob passes (RLAD: behaviour and teacher log-probs of the completions);
* `teacher_forward`, `student_forward`: the backbone (`model.model`, the decoder without the LM head) forward,
  outside generation and outside backward (gradient-checkpointing recomputation counts as backward); GRPO/RLAD's
  no-grad scoring passes are included;
* `loss`: `compute_loss` minus the backbone forwards inside it: LM heads, divergence, reductions (GKD's full
  [B, T, V] logits and `generalized_jsd_loss`; the chunked kernels on our and DistillationTrainer's side);
* `backward`: `accelerator.backward`; `optimizer`: `on_pre_optimizer_step` -> `on_optimizer_step` (clip + AdamW);
* `other`: the rest of the step (batch fetch and collation, buffering, metrics).

`tokens_per_s` = trained completion tokens (loss-mask sum) per step / step time.

**Memory.** Each variant again in a fresh subprocess of its own (same models, same settings, `--warmup` + 2 steps):
on CUDA `torch.cuda.max_memory_allocated()` during a step minus the allocation at its start (`step_peak`), and the
process peak (`process_peak`); on the CPU the same from the resident set (`VmHWM` reset through
`/proc/self/clear_refs` at the step start, glibc told to return freed blocks), over the measured steps.

    python bench/bench_trainers.py                                   # CPU mode -> bench/results/trainers_cpu.{json,md}
    python bench/bench_trainers.py --device cuda                     # GPU mode -> bench/results/trainers_gpu.{json,md}
    python bench/bench_trainers.py --pairs opd_vs_distillation --steps 3 --no-memory   # quick look

GPU mode: random-initialised Qwen3-1.7B student and Qwen3-8B teacher from ../shared/data/configs, bf16, the Qwen3
tokenizer from ../shared/data/tokenizers/qwen3, gradient checkpointing on (TRL's default), batch 8, 512-token
completions. CPU mode: the Qwen3 tokenizer and vocabulary (151,936) on 2-layer backbones (student width 64, teacher
width 128), batch 4, 32-token completions, one thread.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED = ROOT.parent / "shared" / "data"
CONFIGS = SHARED / "configs"
TOKENIZER = SHARED / "tokenizers" / "qwen3"

PAIRS = {
    "opd_vs_distillation": ("opd_on", "distillation"),
    "opd_vs_gkd_offpolicy": ("opd_off", "gkd_off"),
    "opd_vs_gkd_onpolicy": ("opd_on", "gkd_on"),
    "rlad_off_vs_grpo": ("rlad_off", "grpo"),
    "rlad_on_vs_grpo": ("rlad_on", "grpo"),
}
RATIO_KEYS = ("step", "tokens_per_s", "generation", "scoring", "teacher_forward", "student_forward", "loss", "backward",
              "loss_backward", "student_forward_backward", "update", "optimizer", "other")
PHASES = ("generation", "scoring", "teacher_forward", "student_forward", "loss", "backward", "optimizer", "other")
SHAPES = {
    "cpu": dict(
        student=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16),
        teacher=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32),
        batch=4, completion=32, gradient_checkpointing=False,
    ),
    "cuda": dict(student="Qwen3-1.7B", teacher="Qwen3-8B", batch=8, completion=512, gradient_checkpointing=True),
}


# ------------------------------------------------------------------------------------------- models and data


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def build_model(role: str, device: str, tokenizer, seed: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config

    preset = SHAPES[device][role]
    if isinstance(preset, str):
        config = AutoConfig.from_pretrained(CONFIGS / preset)
    else:
        config = Qwen3Config(vocab_size=151_936, max_position_embeddings=4096, tie_word_embeddings=True, **preset)
    config.pad_token_id, config.eos_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, None
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def dataset(tokenizer, rows: int = 256):
    """Conversational prompts and the `messages` GKD's collator reads; `completion` is the text GKD trains on after
    the prompt (the chat template's assistant turn) without its final EOS, which OPDTrainer appends, so that both
    sides train on the same completion tokens with lmbda = 0."""
    from datasets import Dataset

    prompts, completions, messages = [], [], []
    for i in range(rows):
        a, b = 10 + (7 * i) % 89, 10 + (13 * i) % 89
        prompt = [{"role": "user", "content": f"Compute {a}+{b}. Write every step."}]
        conversation = prompt + [{"role": "assistant", "content": f"{a}+{b}={a + b}. \\boxed{{{a + b}}}"}]
        head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(conversation, tokenize=False)
        completion = full[len(head):].rstrip("\n")
        completions.append(completion.removesuffix(tokenizer.eos_token))
        prompts.append(prompt)
        messages.append(conversation)
    return Dataset.from_dict({"prompt": prompts, "completion": completions, "messages": messages})


def length_reward(completions, **kwargs):
    """A deterministic, varied reward for GRPO's advantages: the share of digits in the completion text."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in texts]


def common_args(opts, output_dir: str) -> dict:
    cuda = opts.device == "cuda"
    return dict(
        output_dir=output_dir,
        use_cpu=not cuda,
        bf16=cuda,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,  # no logging inside the timed loop
        disable_tqdm=True,
        gradient_checkpointing=opts.gradient_checkpointing,
        per_device_train_batch_size=opts.batch,
        gradient_accumulation_steps=1,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        max_steps=opts.warmup + opts.steps,
        seed=0,
        dataloader_num_workers=0,
    )


def build_trainer(variant: str, student, teacher, tokenizer, opts, output_dir: str):
    """One trainer of a pair. `teacher` may be shared between the two sides (it is frozen)."""
    train = dataset(tokenizer)
    common = common_args(opts, output_dir)
    fixed_length = {"min_new_tokens": opts.completion}
    if variant.startswith("opd_"):
        from trl_opd import OPDConfig, OPDTrainer

        args = OPDConfig(**common, max_completion_length=opts.completion, temperature=1.0,
                         divergence="reverse_kl", lmbda=1.0 if variant == "opd_on" else 0.0,
                         generation_kwargs=fixed_length, **opd_overrides(opts))
        return OPDTrainer(student, teacher_model=teacher, args=args, train_dataset=train, processing_class=tokenizer)
    if variant == "distillation":
        from trl import DistillationConfig, DistillationTrainer

        args = DistillationConfig(**common, max_completion_length=opts.completion, temperature=1.0, beta=1.0,
                                  generation_kwargs=fixed_length)
        return DistillationTrainer(student, teacher_model=teacher, args=args, train_dataset=train,
                                   processing_class=tokenizer)
    if variant.startswith("gkd_"):
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(**common, max_new_tokens=opts.completion, temperature=1.0, beta=1.0,
                         lmbda=1.0 if variant == "gkd_on" else 0.0, max_length=1024)
        # GKD's collator reads a 'prompt' column as an already formatted string: give it the conversations only
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args,
                             train_dataset=train.remove_columns(["prompt", "completion"]),
                             processing_class=tokenizer)
        trainer.generation_config.min_new_tokens = opts.completion
        trainer.generation_kwargs = {**trainer.generation_kwargs, **fixed_length}
        return trainer
    rl = dict(common, per_device_train_batch_size=opts.batch, num_generations=opts.batch,
              max_completion_length=opts.completion, temperature=1.0, beta=0.0, generation_kwargs=fixed_length)
    if variant == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        return GRPOTrainer(student, reward_funcs=[length_reward], args=GRPOConfig(**rl), train_dataset=train,
                           processing_class=tokenizer)
    from trl_opd import RLADConfig, RLADTrainer

    args = RLADConfig(**rl, rlad_alpha=1.0 if variant == "rlad_off" else 0.5)
    return RLADTrainer(student, reward_funcs=[length_reward], args=args, train_dataset=train,
                       processing_class=tokenizer, teacher_model=teacher)


def opd_overrides(opts) -> dict:
    return {} if opts.opd_loss_chunk_size is None else {"loss_chunk_size": opts.opd_loss_chunk_size}


def needs_teacher(variant: str) -> bool:
    return variant != "grpo"


# ------------------------------------------------------------------------------------------- phase timers


class PhaseTimer:
    """Per-step phase times of one trainer, from wrapped methods, module hooks and callbacks.

    Two clocks: wall time (on CUDA after a synchronize) and this thread's CPU time (`time.thread_time`). With one
    torch thread on the CPU every op runs in the calling thread, so the CPU time is the work done for this trainer
    and barely moves when other jobs share the machine; on CUDA only the wall time means anything."""

    current: "PhaseTimer | None" = None  # the trainer whose turn it is (module hooks of a shared teacher read it)

    def __init__(self, name: str, cuda: bool):
        self.name, self.cuda = name, cuda
        self.steps: list[dict] = []
        self.in_generation = self.in_backward = False
        self._reset()

    def _reset(self):
        self.acc = {clock: dict.fromkeys(PHASES, 0.0) for clock in ("wall", "cpu")}
        self.tokens = 0

    def now(self) -> tuple[float, float]:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter(), time.thread_time()

    def add(self, phase: str, start: tuple[float, float], minus: tuple[float, float] = (0.0, 0.0)):
        end = self.now()
        self.acc["wall"][phase] += end[0] - start[0] - minus[0]
        self.acc["cpu"][phase] += end[1] - start[1] - minus[1]

    def start_step(self):
        self._reset()
        self.t_step = self.now()

    def end_step(self):
        end = self.now()
        record = {"tokens": self.tokens}
        for index, clock in enumerate(("wall", "cpu")):
            phases = dict(self.acc[clock])
            total = end[index] - self.t_step[index]
            phases["other"] = total - sum(phases[p] for p in PHASES if p != "other")
            record[clock] = dict(phases, step=total)
        self.steps.append(record)

    def timed(self, phase: str, fn, flag: str | None = None):
        def wrapper(*args, **kwargs):
            if flag:
                setattr(self, flag, True)
            start = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(phase, start)
                if flag:
                    setattr(self, flag, False)

        return wrapper

    def timed_excluding(self, phase: str, fn, inner: tuple[str, ...]):
        """Time of `fn` minus the time the phases in `inner` gained meanwhile (nested timers)."""

        def snapshot():
            return tuple(sum(self.acc[c][p] for p in inner) for c in ("wall", "cpu"))

        def wrapper(*args, **kwargs):
            before, start = snapshot(), self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(phase, start, minus=tuple(a - b for a, b in zip(snapshot(), before)))

        return wrapper

    def _forwards(self) -> tuple[float, float]:
        return tuple(self.acc[c]["student_forward"] + self.acc[c]["teacher_forward"] for c in ("wall", "cpu"))

    def timed_loss(self, fn, token_count):
        def wrapper(model, inputs, *args, **kwargs):
            forwards, start = self._forwards(), self.now()
            try:
                return fn(model, inputs, *args, **kwargs)
            finally:
                inside = tuple(after - before for after, before in zip(self._forwards(), forwards))
                self.add("loss", start, minus=inside)
                self.tokens += int(token_count(inputs))

        return wrapper

    @staticmethod
    def hook_backbone(module, phase: str):
        def pre(mod, args):
            timer = PhaseTimer.current
            if timer is None or timer.in_generation or timer.in_backward:
                mod._bench_start = None
                return
            mod._bench_start = timer.now()

        def post(mod, args, output):
            timer = PhaseTimer.current
            if timer is not None and getattr(mod, "_bench_start", None) is not None:
                timer.add(phase, mod._bench_start)
                mod._bench_start = None

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def trained_tokens(inputs) -> int:
    if "completion_mask" in inputs:  # OPD, DistillationTrainer, GRPO, RLAD
        mask = inputs["completion_mask"]
        return int((mask * inputs["tool_mask"]).sum() if "tool_mask" in inputs else mask.sum())
    return int((inputs["labels"][:, 1:] != -100).sum())  # GKD


def instrument(trainer, timer: PhaseTimer, teacher):
    """Wrap the trainer's methods with the timer; hooks on the student's and the teacher's backbones."""
    from transformers import TrainerCallback

    if hasattr(trainer, "generate_on_policy_outputs") and not hasattr(trainer, "_generate"):  # GKD
        trainer.generate_on_policy_outputs = timer.timed("generation", trainer.generate_on_policy_outputs,
                                                         "in_generation")
    else:
        trainer._generate = timer.timed("generation", trainer._generate, "in_generation")
    if hasattr(trainer, "_generate_and_score_completions"):  # not GKD
        trainer._generate_and_score_completions = timer.timed_excluding(
            "scoring", trainer._generate_and_score_completions, ("generation", "student_forward", "teacher_forward")
        )
    trainer.compute_loss = timer.timed_loss(trainer.compute_loss, trained_tokens)
    trainer.accelerator.backward = timer.timed("backward", trainer.accelerator.backward, "in_backward")
    handles = PhaseTimer.hook_backbone(trainer.model.model, "student_forward")
    if teacher is not None:
        handles += PhaseTimer.hook_backbone(teacher.model, "teacher_forward")

    class OptimizerTimer(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            timer.t_opt = timer.now()

        def on_optimizer_step(self, args, state, control, **kwargs):
            timer.add("optimizer", timer.t_opt)

    trainer.add_callback(OptimizerTimer())
    return handles


# ------------------------------------------------------------------------------------------- lock-step threads


class Lockstep:
    """Trainers take strict turns, one optimizer step each."""

    def __init__(self, timers: list[PhaseTimer]):
        self.timers = timers
        self.turn = 0
        self.done = [False] * len(timers)
        self.cond = threading.Condition()

    def wait(self, index: int):
        with self.cond:
            self.cond.wait_for(lambda: self.turn == index)
        PhaseTimer.current = self.timers[index]

    def pass_turn(self, index: int, finished: bool = False):
        with self.cond:
            self.done[index] = self.done[index] or finished
            others = [(index + k) % len(self.timers) for k in range(1, len(self.timers) + 1)]
            self.turn = next((i for i in others if not self.done[i]), -1)
            self.cond.notify_all()

    def callback(self, index: int):
        from transformers import TrainerCallback

        lockstep, timer = self, self.timers[index]

        class Turns(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                lockstep.wait(index)
                timer.start_step()

            def on_step_end(self, args, state, control, **kwargs):
                timer.end_step()
                if state.global_step < args.max_steps:
                    lockstep.pass_turn(index)
                    lockstep.wait(index)
                    timer.start_step()

            def on_train_end(self, args, state, control, **kwargs):
                lockstep.pass_turn(index, finished=True)

        return Turns()


def run_alternating(trainers, timers):
    lockstep = Lockstep(timers)
    for index, trainer in enumerate(trainers):
        trainer.add_callback(lockstep.callback(index))
    errors = []

    def target(index):
        try:
            trainers[index].train()
        except BaseException as error:  # release the other side, report after joining
            errors.append((timers[index].name, error))
            lockstep.pass_turn(index, finished=True)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(len(trainers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        name, error = errors[0]
        raise RuntimeError(f"{name} failed: {error!r}") from error


# ------------------------------------------------------------------------------------------- memory (child)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def child(opts) -> None:
    """One variant alone in this process: peak memory during its measured steps."""
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(opts.threads)
    cuda = opts.device == "cuda"
    tokenizer = load_tokenizer()
    start_rss = _status_kib("VmRSS") / 1024**2
    teacher = build_model("teacher", opts.device, tokenizer, seed=1) if needs_teacher(opts.child) else None
    student = build_model("student", opts.device, tokenizer, seed=0)
    models_gb = (torch.cuda.memory_allocated() / 1024**3) if cuda else _status_kib("VmRSS") / 1024**2 - start_rss
    peaks = []

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.base = torch.cuda.memory_allocated()
            else:
                with open("/proc/self/clear_refs", "w") as clear_refs:
                    clear_refs.write("5")
                self.base = _status_kib("VmRSS") * 1024

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step <= opts.warmup:
                return
            if cuda:
                torch.cuda.synchronize()
                peaks.append((torch.cuda.max_memory_allocated() - self.base) / 1024**3)
            else:
                peaks.append((_status_kib("VmHWM") * 1024 - self.base) / 1024**3)

    with tempfile.TemporaryDirectory() as output_dir:
        opts.steps = 2
        trainer = build_trainer(opts.child, student, teacher, tokenizer, opts, output_dir)
        trainer.add_callback(Probe())
        trainer.train()
    process_peak = (torch.cuda.max_memory_allocated() / 1024**3) if cuda else _status_kib("VmHWM") / 1024**2
    print("MEMORY " + json.dumps({"step_peak_gb": max(peaks), "process_peak_gb": process_peak,
                                  "models_gb": models_gb}))


def measure_memory(variant: str, opts) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--device", opts.device, "--batch", str(opts.batch),
               "--completion", str(opts.completion), "--warmup", str(opts.warmup), "--threads", str(opts.threads)]
    if opts.opd_loss_chunk_size is not None:
        command += ["--opd-loss-chunk-size", str(opts.opd_loss_chunk_size)]
    if not opts.gradient_checkpointing:
        command.append("--no-gradient-checkpointing")
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads), "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    if opts.device == "cpu":
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    finished = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in finished.stdout.splitlines() if line.startswith("MEMORY ")]
    if finished.returncode != 0 or not lines:
        raise RuntimeError(f"memory run of {variant} failed:\n{finished.stderr[-3000:]}")
    return json.loads(lines[-1][len("MEMORY "):])


# ------------------------------------------------------------------------------------------- one pair


def summarise(steps: list[dict], warmup: int) -> dict:
    """Medians over the measured steps, per clock. `update` = teacher forward + student forward + loss + backward
    (the loss/backward split depends on the kernel: a fused loss computes its gradients in the forward)."""
    measured = steps[warmup:]
    out = {"steps_measured": len(measured), "tokens": statistics.median(s["tokens"] for s in measured)}
    for clock in ("wall", "cpu"):
        rows = [dict(s[clock]) for s in measured]
        for row in rows:
            row["loss_backward"] = row["loss"] + row["backward"]
            row["student_forward_backward"] = row["student_forward"] + row["loss"] + row["backward"]
            row["update"] = row["teacher_forward"] + row["student_forward_backward"]
        keys = (*PHASES, "loss_backward", "student_forward_backward", "update", "step")
        medians = {key: statistics.median(row[key] for row in rows) for key in keys}
        medians["tokens_per_s"] = statistics.median(s["tokens"] / row["step"] for s, row in zip(measured, rows))
        medians["step_all"] = [round(row["step"], 4) for row in rows]
        out[clock] = medians
    return out


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 1e-9 else None


def run_pair(pair: str, opts, memory_cache: dict) -> dict:
    import torch

    ours, theirs = PAIRS[pair]
    cuda = opts.device == "cuda"
    tokenizer = load_tokenizer()
    teacher = build_model("teacher", opts.device, tokenizer, seed=1) if needs_teacher(ours) else None
    student = build_model("student", opts.device, tokenizer, seed=0)
    students = (student, copy.deepcopy(student))
    timers = [PhaseTimer(ours, cuda), PhaseTimer(theirs, cuda)]
    with tempfile.TemporaryDirectory() as dir_ours, tempfile.TemporaryDirectory() as dir_theirs:
        trainers = [
            build_trainer(ours, students[0], teacher, tokenizer, opts, dir_ours),
            build_trainer(theirs, students[1], teacher if needs_teacher(theirs) else None, tokenizer, opts, dir_theirs),
        ]
        handles = []
        for trainer, timer, variant in zip(trainers, timers, (ours, theirs)):
            handles += instrument(trainer, timer, teacher if needs_teacher(variant) else None)
        run_alternating(trainers, timers)
        for handle in handles:
            handle.remove()
    del trainers, students, student, teacher
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    result = {"ours": ours, "theirs": theirs}
    for side, timer in (("ours", timers[0]), ("theirs", timers[1])):
        result[f"{side}_time"] = summarise(timer.steps, opts.warmup)
    if opts.memory:
        for side, variant in (("ours", ours), ("theirs", theirs)):
            if variant not in memory_cache:
                memory_cache[variant] = measure_memory(variant, opts)
            result[f"{side}_memory"] = memory_cache[variant]
    ratios = {}
    for clock in ("wall", "cpu"):
        t_ours, t_theirs = result["ours_time"][clock], result["theirs_time"][clock]
        ratios[clock] = {key: ratio(t_ours[key], t_theirs[key]) for key in RATIO_KEYS}
    if opts.memory:
        ratios["memory"] = {key: ratio(result["ours_memory"][key], result["theirs_memory"][key])
                            for key in ("step_peak_gb", "process_peak_gb")}
    result["ratios_ours_over_theirs"] = ratios
    return result


# ------------------------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    env, clock = report["environment"], report["headline_clock"]
    clock_words = ("thread CPU seconds (1 torch thread: the work done, robust to other jobs on the machine)"
                   if clock == "cpu" else "wall seconds (CUDA synchronised at every phase boundary)")
    lines = [
        f"# trl_opd trainers vs TRL's trainers ({report['device']})",
        "",
        f"`{report['command']}` on {env['device_name']}; torch {env['torch']}, trl {env['trl']}, transformers "
        f"{env['transformers']}, {report['threads']} torch thread(s). trl_opd: {report.get('trl_opd_code', '?')}. "
        + report.get("code_note", ""),
        "",
        f"Shapes: {json.dumps(report['shape'])}. The two trainers of a pair alternate step by step in one process "
        f"(ours, TRL's, ours, ...): medians of {report['steps']} measured optimizer steps each, after "
        f"{report['warmup']} warm-up step(s). Times are {clock_words}; the wall-clock figures are in the JSON. "
        "Memory: a fresh process per variant; `step Δpeak` = peak during a training step minus the memory at its "
        "start (activations, logits, gradients, optimizer update), `process peak` = the whole process's peak "
        "(CUDA: `max_memory_allocated`; CPU: resident-set high-water mark, which includes Python and the libraries).",
        "",
        "## Ratios ours / TRL (< 1 means ours is faster or leaner; tokens/s: > 1 means ours is faster)",
        "",
        "| pair | step time | tokens/s | generation | scoring | teacher fwd | student fwd+loss+bwd | update | "
        "step Δpeak mem | process peak mem |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "—" if v is None else f"{v:.2f}×"  # noqa: E731
    for r in report["pairs"].values():
        q, m = r["ratios_ours_over_theirs"][clock], r["ratios_ours_over_theirs"].get("memory", {})
        lines.append(
            f"| {r['ours']} / {r['theirs']} | {fmt(q['step'])} | {fmt(q['tokens_per_s'])} | {fmt(q['generation'])} | "
            f"{fmt(q['scoring'])} | {fmt(q['teacher_forward'])} | {fmt(q['student_forward_backward'])} | {fmt(q['update'])} | "
            f"{fmt(m.get('step_peak_gb'))} | {fmt(m.get('process_peak_gb'))} |"
        )
    lines += [
        "",
        "## Per-phase medians (seconds per optimizer step; memory in GB)",
        "",
        "`loss` is `compute_loss` minus the backbone forwards inside it (LM heads + divergence). A fused loss "
        "(ours) computes its gradients inside `loss`, a chunked autograd loss (DistillationTrainer) or a full-logit "
        "loss (GKD) inside `backward`: compare `loss + backward`.",
        "",
        "| pair | trainer | step | generation | scoring | teacher fwd | student fwd | loss | backward | loss + bwd "
        "| optimizer | other | tokens/s | step Δpeak | process peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pair, r in report["pairs"].items():
        for side in ("ours", "theirs"):
            t, m = r[f"{side}_time"][clock], r.get(f"{side}_memory", {})
            mem = lambda k: f"{m[k]:.3f}" if k in m else "—"  # noqa: E731
            lines.append(
                f"| {pair} | {r[side]} | {t['step']:.3f} | {t['generation']:.3f} | {t['scoring']:.3f} | "
                f"{t['teacher_forward']:.3f} | "
                f"{t['student_forward']:.3f} | {t['loss']:.3f} | {t['backward']:.3f} | {t['loss_backward']:.3f} | "
                f"{t['optimizer']:.3f} | {t['other']:.3f} | {t['tokens_per_s']:.0f} | {mem('step_peak_gb')} | "
                f"{mem('process_peak_gb')} |"
            )
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"* {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def code_version() -> str:
    """Where trl_opd was imported from, and the commit of that tree (with '+dirty' if it differs)."""
    import trl_opd

    tree = Path(trl_opd.__file__).resolve().parents[1]
    def git(*args):
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True).stdout.strip()
    commit = os.environ.get("TRL_OPD_COMMIT") or git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = "" if os.environ.get("TRL_OPD_COMMIT") or not git("status", "--porcelain", "trl_opd") else "+dirty"
    return f"{commit}{dirty} ({tree})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--pairs", nargs="+", choices=tuple(PAIRS), default=list(PAIRS))
    parser.add_argument("--steps", type=int, default=4, help="measured steps per trainer")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--completion", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                        default=None)
    parser.add_argument("--opd-loss-chunk-size", type=int, default=None,
                        help="OPDTrainer's loss_chunk_size (default: OPDConfig's)")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--out", default=None, help="results name (default trainers_<device>)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--render", default=None, metavar="JSON", help="only rewrite the Markdown of a results JSON")
    opts = parser.parse_args()
    if opts.render:
        report = json.loads(Path(opts.render).read_text())
        Path(opts.render).with_suffix(".md").write_text(markdown(report))
        return
    shape = SHAPES[opts.device]
    opts.batch = opts.batch or shape["batch"]
    opts.completion = opts.completion or shape["completion"]
    if opts.gradient_checkpointing is None:
        opts.gradient_checkpointing = shape["gradient_checkpointing"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if opts.child:
        child(opts)
        return

    import torch
    import transformers
    import trl

    torch.set_num_threads(opts.threads)
    report = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "device": opts.device,
        "environment": {
            "device_name": torch.cuda.get_device_name() if opts.device == "cuda"
            else f"{os.cpu_count()}-core CPU ({platform.machine()}), shared with other jobs",
            "torch": torch.__version__, "trl": trl.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "trl_opd_code": code_version(),
        "threads": opts.threads, "steps": opts.steps, "warmup": opts.warmup,
        "shape": {"student": shape["student"], "teacher": shape["teacher"], "vocab": 151_936, "batch": opts.batch,
                  "completion_tokens": opts.completion, "gradient_checkpointing": opts.gradient_checkpointing,
                  "opd_loss_chunk_size": opts.opd_loss_chunk_size or "OPDConfig default"},
        "headline_clock": "wall" if opts.device == "cuda" else "cpu",
        "pairs": {},
    }
    memory_cache: dict = {}
    name = opts.out or f"trainers_{opts.device}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    for pair in opts.pairs:
        started = time.perf_counter()
        report["pairs"][pair] = run_pair(pair, opts, memory_cache)
        q = report["pairs"][pair]["ratios_ours_over_theirs"]
        print(f"{pair}: step {q[report['headline_clock']]['step']}x (wall {q['wall']['step']}x), "
              f"step peak {q.get('memory', {}).get('step_peak_gb')}x ({time.perf_counter() - started:.0f} s)",
              flush=True)
        # written after every pair, so a failure later keeps what was measured
        (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / f"{name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
