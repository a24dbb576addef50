"""Supervised training of testbed models with TRL's SFTTrainer, and a disk cache of trained checkpoints.

``sft`` trains on prompt-completion data (loss on the completion and its EOS only) and can stop at a
target accuracy, checked by greedy decoding every ``eval_every`` steps. ``build_teacher`` and
``build_student`` train a model for a task once and cache it under a key derived from everything that
determines it (task, model, training, seed, ``CACHE_VERSION``); later calls return the cached path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from trl_opd.testbed.evaluation import accuracy
from trl_opd.testbed.models import ModelSpec, config_from_spec, tiny_model
from trl_opd.testbed.task import TaskConfig, derive_seed, heldout_problems, task_stream, validation_problems
from trl_opd.testbed.tokenizers import task_tokenizer

# Bump when a change in this package makes old cached checkpoints stale (task text, tokenizer, training loop).
CACHE_VERSION = "1"
METADATA_FILE = "testbed.json"
# Checkpoints shipped with the package (the README's toy pair), used before the cache; a build is forced with
# TRL_OPD_BUILD_TESTBED=1 (tests/test_testbed.py rebuilds them and compares bit for bit).
SHIPPED_DIR = Path(__file__).resolve().parent / "assets"


@dataclass(frozen=True)
class TrainSpec:
    """How ``sft`` trains a testbed model (defaults: the main-setting teacher recipe).

    The defaults are ``reference/testbed.md``'s recipe with a longer schedule: with its 1,300 steps our main
    teacher ended at 96.7% validation / 93.0% held-out, its errors single-digit carries, still improving.

    Attributes:
        steps: optimiser steps of the schedule (the cosine decays to 0 at ``steps``).
        batch_size: problems per step.
        learning_rate: peak AdamW learning rate (betas 0.9 / 0.98, no weight decay, gradient clip 1.0).
        warmup_steps: linear warm-up before the cosine.
        eval_every: evaluate the validation accuracy every this many steps (0 = never).
        target_accuracy: stop at the first evaluation with at least this accuracy (None = run all steps).
        strategy: train on this strategy only (a cold-started student); None = the task's uniform mix.
    """

    steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    eval_every: int = 100
    target_accuracy: float | None = 0.98
    strategy: int | None = None

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1.")
        if self.eval_every < 0 or self.warmup_steps < 0:
            raise ValueError("eval_every and warmup_steps must be >= 0.")
        if self.target_accuracy is not None and not (0.0 < self.target_accuracy <= 1.0 and self.eval_every > 0):
            raise ValueError("target_accuracy must be in (0, 1] and needs eval_every > 0 to be checked.")


@dataclass
class SFTResult:
    """What ``sft`` did: ``steps`` run, ``wall_time_s``, ``cpu_time_s`` (this process's CPU time: the wall time
    the run would take alone on ``torch.get_num_threads() == 1``), ``evaluations`` [(step, accuracy)], ``losses``
    [(step, loss)], ``reached_target`` (stopped early at the target accuracy)."""

    steps: int
    wall_time_s: float
    cpu_time_s: float
    evaluations: list[tuple[int, float]] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)
    reached_target: bool = False

    @property
    def last_accuracy(self) -> float | None:
        return self.evaluations[-1][1] if self.evaluations else None


class AccuracyStopCallback(TrainerCallback):
    """Evaluates greedy accuracy on ``problems`` every ``every`` steps; stops training at ``target``."""

    def __init__(self, model, tokenizer, problems, every: int, target: float | None = None, verbose: bool = True):
        self.model, self.tokenizer, self.problems = model, tokenizer, list(problems)
        self.every, self.target, self.verbose = every, target, verbose
        self.evaluations: list[tuple[int, float]] = []
        self.reached_target = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.every <= 0 or state.global_step % self.every:
            return control
        score = accuracy(self.model, self.tokenizer, self.problems)
        self.evaluations.append((state.global_step, score))
        if self.verbose:
            tqdm.write(f"step {state.global_step}: validation accuracy {score:.1%}")
        if self.target is not None and score >= self.target:
            self.reached_target = True
            control.should_training_stop = True
        return control


def sft(
    model,
    tokenizer,
    train_dataset,
    *,
    steps: int,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    warmup_steps: int = 50,
    eval_problems=None,
    eval_every: int = 0,
    target_accuracy: float | None = None,
    seed: int = 0,
    show_progress: bool = True,
    logging_steps: int = 50,
) -> SFTResult:
    """Train ``model`` in place with TRL's SFTTrainer on prompt-completion data.

    Loss on the completion and the EOS the trainer appends; AdamW (0.9, 0.98), ``warmup_steps`` linear
    warm-up then cosine to ``steps``, gradient clip 1.0, CPU, float32. Uses ``torch.get_num_threads()``
    threads: on a shared CPU call ``torch.set_num_threads(1)`` first (a tiny model gains little from more).

    Args:
        train_dataset: a ``datasets.Dataset`` or ``IterableDataset`` (e.g. ``task.task_stream(cfg)``) with
            ``prompt`` and ``completion``; a ``Dataset`` shorter than ``steps * batch_size`` is cycled.
        eval_problems: problems (``prompt``, ``answer``) for the accuracy checks; needed when ``eval_every > 0``.
        eval_every: evaluate every this many steps (0 = never).
        target_accuracy: stop at the first evaluation reaching it.

    Returns:
        ``SFTResult``.
    """
    from trl import SFTTrainer

    if eval_every > 0 and not eval_problems:
        raise ValueError("eval_every > 0 needs eval_problems to evaluate on.")
    if target_accuracy is not None and eval_every <= 0:
        raise ValueError("target_accuracy needs eval_every > 0: the target is checked at the evaluations.")
    callback = AccuracyStopCallback(model, tokenizer, eval_problems or [], eval_every, target_accuracy, show_progress)
    with tempfile.TemporaryDirectory(prefix="trl_opd_sft_") as output_dir:
        args = _sft_config(
            output_dir=output_dir,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            warmup_steps=warmup_steps,
            logging_steps=logging_steps,
            disable_tqdm=not show_progress,
            seed=seed,
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer, callbacks=[callback]
        )
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.train()
        wall_time, cpu_time = time.perf_counter() - start, time.process_time() - cpu_start
    losses = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    return SFTResult(
        trainer.state.global_step, wall_time, cpu_time, callback.evaluations, losses, callback.reached_target
    )


def _sft_config(**kwargs):
    """SFTConfig with the testbed's fixed choices: cosine schedule, AdamW (0.9, 0.98), clip 1.0, CPU, float32."""
    from trl import SFTConfig

    with warnings.catch_warnings():  # transformers 5.23 renames gradient_checkpointing; only the value matters
        warnings.simplefilter("ignore", FutureWarning)
        return SFTConfig(
            lr_scheduler_type="cosine",
            adam_beta1=0.9,
            adam_beta2=0.98,
            weight_decay=0.0,
            max_grad_norm=1.0,
            completion_only_loss=True,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            report_to="none",
            save_strategy="no",
            **kwargs,
        )


# ----------------------------------------------------------------------------------------------------------
# Cached builds

DEFAULT_TRAINING = {
    "teacher": TrainSpec(),  # 2,000-step cosine, stop at 98% validation accuracy
    "student": TrainSpec(eval_every=20, target_accuracy=0.15, strategy=0),  # cold start: stop early, one strategy
}


def default_cache_dir() -> Path:
    """``$TRL_OPD_CACHE``, else ``~/.cache/trl_opd/testbed``."""
    return Path(os.environ.get("TRL_OPD_CACHE") or Path.home() / ".cache" / "trl_opd" / "testbed")


def cache_key(role: str, task: TaskConfig, model: ModelSpec, training: TrainSpec, seed: int) -> str:
    """Hex digest identifying a trained checkpoint: every input that changes the weights, and the version."""
    parts = {
        "role": role,
        "task": asdict(task),
        "model": asdict(model),
        "training": asdict(training),
        "seed": seed,
        "version": CACHE_VERSION,
    }
    return f"{derive_seed(parts):016x}"


def _is_complete(entry: Path, key: str) -> bool:
    """An entry counts only when its metadata (written last, before the atomic rename) names the same key."""
    try:
        return json.loads((entry / METADATA_FILE).read_text())["key"] == key
    except (OSError, ValueError, KeyError):
        return False


def read_metadata(path) -> dict:
    """The ``testbed.json`` of a built checkpoint: configs, training history, validation/held-out accuracy."""
    return json.loads((Path(path) / METADATA_FILE).read_text())


def load_pretrained(path):
    """``(model, tokenizer)`` of a saved testbed checkpoint (float32, CPU, eval mode)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    return model.eval(), tokenizer


def build_model(
    role: str,
    task: TaskConfig | None = None,
    model: ModelSpec | None = None,
    seed: int = 0,
    cache_dir=None,
    training: TrainSpec | None = None,
    show_progress: bool = True,
) -> str:
    """Train (or fetch from the cache) a ``role`` model on ``task`` and return its directory.

    Args:
        role: "teacher" or "student"; picks the defaults of ``model`` (``ModelSpec.for_role``) and ``training``
            (``DEFAULT_TRAINING``).
        task: default ``TaskConfig()`` (the main setting).
        model: default ``ModelSpec.for_role(role)``.
        seed: model initialisation and training-data order.
        cache_dir: default ``default_cache_dir()``.
        training: default ``DEFAULT_TRAINING[role]``.
        show_progress: progress bar and log lines while training (minutes on a CPU).

    A checkpoint shipped with the package (``SHIPPED_DIR``: the README's toy pair) is returned as it is, unless
    ``TRL_OPD_BUILD_TESTBED=1``. Builds train on one CPU thread, so that they are reproducible bit for bit.

    The directory holds the model, its tokenizer and ``testbed.json`` (see ``read_metadata``). Training
    happens in a temporary sibling directory renamed into place at the end, so an interrupted run never
    leaves an entry that a later call would use; an incomplete entry found in place is rebuilt.
    """
    if role not in DEFAULT_TRAINING:
        raise ValueError(f"role must be one of {sorted(DEFAULT_TRAINING)}, got {role!r}.")
    task = task or TaskConfig()
    model = model or ModelSpec.for_role(role)
    training = training or DEFAULT_TRAINING[role]
    key = cache_key(role, task, model, training, seed)
    shipped = SHIPPED_DIR / f"{role}-{key}"
    if os.environ.get("TRL_OPD_BUILD_TESTBED") != "1" and _is_complete(shipped, key):
        return str(shipped)  # the same weights a build gives on this kind of CPU, without the minutes of training
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def write(staging: Path) -> None:
        metadata = _train_and_save(staging, role, task, model, training, seed, show_progress)
        metadata["key"] = key
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2))

    return build_cache_entry(root / f"{role}-{key}", lambda entry: _is_complete(entry, key), write)


def build_cache_entry(entry: Path, is_complete, write) -> str:
    """``entry`` as a string, first built by ``write(staging)`` unless ``is_complete(entry)`` already holds.

    ``write`` fills a temporary sibling directory, renamed into place at the end, so an interrupted build never
    leaves an entry that a later call would use; an incomplete entry found in place is replaced; when a concurrent
    build of the same entry wins the race, its entry is used. The staging directory is removed in every case.
    """
    if is_complete(entry):
        return str(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = entry.parent / f".tmp-{entry.name}-{uuid.uuid4().hex[:8]}"
    try:
        write(staging)
        _publish(staging, entry, is_complete)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(entry)


def build_teacher(*args, **kwargs) -> str:
    """``build_model("teacher", ...)``: trained on ``task``'s uniform strategy mix until 98% validation accuracy."""
    return build_model("teacher", *args, **kwargs)


def build_student(*args, **kwargs) -> str:
    """``build_model("student", ...)``: cold-started on strategy 0, stopped at the first validation eval >= 15%."""
    return build_model("student", *args, **kwargs)


def _publish(staging: Path, entry: Path, is_complete) -> None:
    if entry.exists() and not is_complete(entry):
        shutil.rmtree(entry)  # left incomplete by someone else: replace it
    try:
        os.rename(staging, entry)
    except OSError:
        if not is_complete(entry):  # a concurrent build of the same entry won the race: use its entry
            raise


@contextlib.contextmanager
def _one_thread():
    """torch on one CPU thread for a build: the summation order of every kernel, hence the weights, no longer depends
    on the machine's core count (a build is then bit for bit the shipped checkpoint on the same kind of CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@_one_thread()
def _train_and_save(directory: Path, role, task, model_spec, training, seed, show_progress) -> dict:
    tokenizer = task_tokenizer(model_spec.tokenizer, task)
    model = tiny_model(tokenizer, config_from_spec(model_spec, tokenizer), seed=seed)
    if show_progress:
        tqdm.write(f"Training the testbed {role} ({model_spec}) on {task} with {training}, seed {seed}")
    result = sft(
        model,
        tokenizer,
        task_stream(task, seed=seed, strategy=training.strategy),
        steps=training.steps,
        batch_size=training.batch_size,
        learning_rate=training.learning_rate,
        warmup_steps=training.warmup_steps,
        eval_problems=validation_problems(task),
        eval_every=training.eval_every,
        target_accuracy=training.target_accuracy,
        seed=seed,
        show_progress=show_progress,
    )
    heldout = accuracy(model, tokenizer, heldout_problems(task))
    if training.target_accuracy is not None and not result.reached_target:
        warnings.warn(
            f"The testbed {role} did not reach its target validation accuracy {training.target_accuracy:.0%} in "
            f"{training.steps} steps (last {result.last_accuracy}); caching it anyway.",
            stacklevel=3,
        )
    if show_progress:
        tqdm.write(f"{role}: {result.steps} steps, {result.wall_time_s:.0f} s, held-out accuracy {heldout:.1%}")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return {
        "version": CACHE_VERSION,
        "role": role,
        "task": asdict(task),
        "model": asdict(model_spec),
        "training": asdict(training),
        "seed": seed,
        "steps": result.steps,
        "wall_time_s": round(result.wall_time_s, 1),
        "cpu_time_s": round(result.cpu_time_s, 1),
        "reached_target": result.reached_target,
        "validation_history": result.evaluations,
        "validation_accuracy": result.last_accuracy,
        "heldout_accuracy": heldout,
        "num_parameters": model.num_parameters(),
        "built_with": build_conditions(),
    }


def build_conditions() -> dict:
    """What a bit-for-bit rebuild needs to share with a build: torch's version and the CPU kernels it picks."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": 1}


# ----------------------------------------------------------------------------------------------------------
# The measured settings


@dataclass(frozen=True)
class Setting:
    """A task with the teacher and student recipes measured for it."""

    task: TaskConfig
    teacher_training: TrainSpec
    student_training: TrainSpec
    teacher_model: ModelSpec = ModelSpec.for_role("teacher")
    student_model: ModelSpec = ModelSpec.for_role("student")

    def recipe(self, role: str) -> tuple[ModelSpec, TrainSpec]:
        """``(model, training)`` of ``role`` ("teacher" or "student") in this setting."""
        if role == "teacher":
            return self.teacher_model, self.teacher_training
        if role == "student":
            return self.student_model, self.student_training
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}.")


SETTINGS = {
    # 2 operations, 2-digit operands, + and -: the near-deterministic main task.
    "main": Setting(TaskConfig(), DEFAULT_TRAINING["teacher"], DEFAULT_TRAINING["student"]),
    # "Compute a+b+c." with 6 first-pair strategies: teacher on the uniform mix, student on left to right only.
    "multistrategy": Setting(
        TaskConfig(allow_subtraction=False, num_strategies=6),
        TrainSpec(steps=1200, target_accuracy=0.97),
        replace(DEFAULT_TRAINING["student"], target_accuracy=0.12),
    ),
    # "multistrategy" with a byte-level BPE teacher (digits and spaces isolated, words merged; same size and recipe)
    # and the same character-level student: a cross-tokenizer pair for SimCTTrainer (the student's cache entry is
    # the one of "multistrategy"). Why "bpe_words" and not "bpe": see `trl_opd.testbed.tokenizers.bpe_tokenizer`.
    "multistrategy_bpe_teacher": Setting(
        TaskConfig(allow_subtraction=False, num_strategies=6),
        TrainSpec(steps=1200, target_accuracy=0.97),
        replace(DEFAULT_TRAINING["student"], target_accuracy=0.12),
        teacher_model=ModelSpec.for_role("teacher", tokenizer="bpe_words"),
    ),
    # The reverse pair: the character-level teacher of "multistrategy" (same cache entry) and a "bpe_words" student
    # (same size and cold start). The teacher's tokenisation of any text is canonical, so it scores every student
    # sample in its own terms; the other direction breaks on the teacher's non-canonical segmentations
    # (bench/results/simct_testbed_multistrategy_bpe_teacher.md).
    "multistrategy_bpe_student": Setting(
        TaskConfig(allow_subtraction=False, num_strategies=6),
        TrainSpec(steps=1200, target_accuracy=0.97),
        replace(DEFAULT_TRAINING["student"], target_accuracy=0.12),
        student_model=ModelSpec.for_role("student", tokenizer="bpe_words"),
    ),
    # Seconds, not minutes: a barely trained pair for smoke runs (the quickstart notebook in the test suite).
    # Its accuracies mean nothing; it only exercises the code paths.
    "smoke": Setting(
        TaskConfig(num_operations=1),
        TrainSpec(steps=10, batch_size=8, warmup_steps=0, eval_every=0, target_accuracy=None),
        TrainSpec(steps=3, batch_size=8, warmup_steps=0, eval_every=0, target_accuracy=None, strategy=0),
    ),
}
# The smoke pair with a byte-level BPE teacher: a cross-tokenizer smoke run (SimCTTrainer).
SETTINGS["smoke_bpe_teacher"] = replace(
    SETTINGS["smoke"], teacher_model=ModelSpec.for_role("teacher", tokenizer="bpe_words")
)


def heldout_accuracies(prepared: dict) -> dict:
    """Greedy accuracy on the 300 held-out problems of the teacher and the student of a ``prepare`` result (or of any
    dict with ``task``, ``teacher`` and ``student`` paths): ``{"teacher": float, "student": float}``."""
    problems = heldout_problems(prepared["task"])
    return {role: accuracy(*load_pretrained(prepared[role]), problems) for role in ("teacher", "student")}


def distillation_args(output_dir: str, seed: int, steps: int, **overrides) -> dict:
    """The testbed's distillation settings (``reference/testbed.md``; the toy YAMLs use the same): batch 32, lr 1e-3
    constant (models trained from scratch), T = 1, at most 40 completion tokens, CPU, nothing saved or reported.
    Keyword arguments for ``OPDConfig`` / ``SimCTConfig``; ``overrides`` replace or add fields."""
    return {
        "output_dir": output_dir,
        "max_steps": steps,
        "per_device_train_batch_size": 32,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "max_grad_norm": 1.0,
        "seed": seed,
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 25,
        "disable_tqdm": True,
        "temperature": 1.0,
        "max_completion_length": 40,
        **overrides,
    }


def get_setting(name: str) -> Setting:
    if name not in SETTINGS:
        raise ValueError(f"Unknown testbed setting {name!r}; choose one of {sorted(SETTINGS)}.")
    return SETTINGS[name]


def prepare(setting: str = "main", seed: int = 0, cache_dir=None, show_progress: bool = True) -> dict:
    """Teacher and student of a named setting, built or cached: ``dict(task=TaskConfig, teacher=path, student=path)``."""
    chosen = get_setting(setting)
    paths = {}
    for role in ("teacher", "student"):
        model, training = chosen.recipe(role)
        paths[role] = build_model(role, chosen.task, model, seed, cache_dir, training, show_progress)
    return {"task": chosen.task, **paths}
