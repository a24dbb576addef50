"""What the scripts in ``recipes/`` share: argument parsing, model and data loading (real or toy testbed), saving a
run and the toy report.

A recipe imports these and spells out, top to bottom, what its method does: parse the config, build the trainer,
train, save, evaluate and report::

    recipe, args, model_args = parse_recipe_args(OPDConfig)     # --config file.yaml + command-line overrides
    setup = load_models_and_data(recipe, args, model_args)      # toy testbed (teacher evaluated) or real models
    trainer = OPDTrainer(model=setup.student, teacher_model=setup.teacher, args=args, ...)
    setup.evaluate("student before", trainer.model)             # toy only: held-out greedy accuracy
    trainer.train()
    save_run(trainer)
    setup.evaluate("student after", trainer.model)
    setup.report(args.output_dir)                               # toy: teacher / before / after, gap recovered
"""

from __future__ import annotations

import atexit
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from datasets import load_dataset
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config


@dataclass
class RecipeArguments(ScriptArguments):
    """Dataset arguments of TRL's `ScriptArguments`, plus the offline toy testbed.

    testbed: name of a `trl_opd.testbed` setting ("main", "multistrategy", or for SimCT "multistrategy_bpe_student"
        (a character-level teacher and a BPE student) and "multistrategy_bpe_teacher" (the reverse); "smoke" and
        "smoke_bpe_teacher" are barely trained pairs that build in seconds, for checking that a recipe runs). When
        set, the teacher and the student are the testbed's (trained from scratch on the first run, then cached), the
        training prompts come from the task's generator, and the held-out accuracy is reported before and after
        training. `model_name_or_path`, `teacher_model_name_or_path` and `dataset_name` are then ignored.
    testbed_seed: seed of the testbed's teacher and student (not of training; that is `seed`).
    testbed_student: "default" (the setting's cached student) or "context_literate" (a student that can read a
        worked solution in its prompt: the starting point of the self-distillation recipes OPSD, PW-OPSD and
        EDGE-OPD, whose teacher is the student reading `trl_opd.testbed.context.CONTEXT_TEMPLATE`).
    testbed_train_size: number of training prompts drawn from the task generator.
    testbed_eval_size: number of held-out problems used for the accuracy report (at most 300).
    serve_teacher: toy only, one process: serve the testbed's teacher with `trl-opd serve-teacher` on a free
        loopback port for this run (stopped at its end) and train against it (`teacher_server_backend: trl_opd`,
        `teacher_model_server_url` set to it): the served-teacher set-up on one machine, offline.
    dry_run: parse and validate the YAML and the command line (every config's own checks run), print the
        resolved arguments and exit before loading any model or dataset.
    """

    dataset_name: str | None = field(default=None, metadata={"help": "HF dataset name or local data file."})
    testbed: str | None = field(
        default=None, metadata={"help": "Offline toy testbed setting, e.g. multistrategy (trl_opd.testbed.SETTINGS)."}
    )
    testbed_seed: int = field(default=0, metadata={"help": "Seed of the toy teacher and student."})
    testbed_student: str = field(
        default="default", metadata={"help": "Toy student: default | context_literate (self-distillation recipes)."}
    )
    testbed_train_size: int = field(default=20000, metadata={"help": "Toy training prompts."})
    testbed_eval_size: int = field(default=300, metadata={"help": "Toy held-out problems for the report."})
    serve_teacher: bool = field(
        default=False, metadata={"help": "Toy, one process: serve the testbed teacher (trl-opd serve-teacher) and "
                                         "train against the server."}
    )
    dry_run: bool = field(
        default=False, metadata={"help": "Validate the config, print it and exit before loading anything."}
    )


def recipe_parser(config_class, *extra_classes, prog: str | None = None) -> TrlParser:
    """The `TrlParser` of a recipe: `RecipeArguments`, the trainer's config, `ModelConfig` and `extra_classes`."""
    return TrlParser((RecipeArguments, config_class, ModelConfig, *extra_classes), prog=prog)


def parse_recipe_args(config_class, *extra_classes, args: list[str] | None = None, prog: str | None = None):
    """`(recipe, training args, model args, *extra)` from `--config file.yaml` plus command-line overrides.

    `extra_classes`: further argument dataclasses of a recipe (e.g. `ColdStartArguments`), parsed from the same YAML.
    `args`: the command line (default `sys.argv[1:]`); `prog`: the name `--help` and errors show (`trl-opd opd`).
    Unknown YAML keys are errors (TRL's scripts pass `fail_with_unknown_args=False`; we keep typos loud).
    """
    parser = recipe_parser(config_class, *extra_classes, prog=prog)
    parsed = tuple(parser.parse_args_and_config(args))
    recipe = parsed[0]
    if recipe.testbed is None and recipe.dataset_name is None:
        parser.error("Set `dataset_name` (real data) or `testbed` (offline toy) in the YAML or on the command line.")
    if recipe.testbed_student not in ("default", "context_literate"):
        parser.error(f"testbed_student must be 'default' or 'context_literate', got {recipe.testbed_student!r}.")
    if recipe.dry_run:
        _print_resolved(parsed)
        raise SystemExit(0)
    atexit.register(_destroy_process_group)
    return parsed


def _destroy_process_group() -> None:
    """Free the finished trainer and destroy the process group of an `accelerate launch` run before the interpreter
    exits.

    In our 2-process tests a rank occasionally (about 1 launch in 30 under load) aborted with SIGABRT in interpreter
    finalization, after all its work: a C++ thread of torch's distributed runtime destroyed while still joinable.
    The finished trainer (its DDP-wrapped model holds the process group) can outlive `main` through reference
    cycles; collecting it first lets the group go while the interpreter is whole. This is a mitigation, not a
    measured fix (the tests end their scripts with `os._exit`, see tests/tiny.py). No barrier: a rank that exits on
    an error must not wait for the others.
    """
    import gc

    import torch

    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _print_resolved(parsed) -> None:
    """The arguments that differ from their declared defaults, per argument class (what `dry_run` shows)."""
    from dataclasses import MISSING, fields

    for arguments in parsed:
        changed = {}
        for item in fields(arguments):
            default = item.default_factory() if item.default_factory is not MISSING else item.default
            if item.init and getattr(arguments, item.name) != default:
                changed[item.name] = getattr(arguments, item.name)
        print(f"[trl_opd] {type(arguments).__name__}: {changed}", flush=True)


@dataclass
class RecipeSetup:
    """What a recipe trains with. On the toy testbed: model objects, the task's prompts and held-out problems (and
    `results`, the accuracies measured so far). On real models: the names the trainer loads, the dataset, the PEFT
    config."""

    student: object
    teacher: object
    tokenizer: object
    train_dataset: object
    peft_config: object = None
    eval_problems: list | None = None
    results: dict = field(default_factory=dict)

    def evaluate(self, name: str, model, tokenizer=None) -> float | None:
        """Held-out greedy accuracy on the toy task (no-op for real models: use eval/aime.py there).
        `tokenizer`: the model's own when it is not the student's (a cross-tokenizer teacher)."""
        if self.eval_problems is None:
            return None
        from trl_opd.testbed.evaluation import accuracy

        score = accuracy(model, tokenizer if tokenizer is not None else self.tokenizer, self.eval_problems)
        self.results[name] = score
        if _is_main_process():
            print(f"[trl_opd] {name}: {100 * score:.1f}% on {len(self.eval_problems)} held-out problems", flush=True)
        return score

    def report(self, output_dir: str) -> dict | None:
        """Toy only: print teacher / before / after and the share of the gap recovered; write them to
        `output_dir/results.json` (main process)."""
        results = self.results
        if not {"teacher", "student before", "student after"} <= results.keys():
            return None
        gap = results["teacher"] - results["student before"]
        results["gap_recovered"] = (results["student after"] - results["student before"]) / gap if gap > 0 else None
        if _is_main_process():
            recovered = results["gap_recovered"]
            print(
                f"\n[trl_opd] teacher {100 * results['teacher']:.1f}% | student before"
                f" {100 * results['student before']:.1f}% | student after {100 * results['student after']:.1f}%"
                f" | gap recovered {'n/a' if recovered is None else f'{recovered:.2f}'}",
                flush=True,
            )
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "results.json").write_text(json.dumps(results, indent=2))
        return results


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def load_models_and_data(recipe: RecipeArguments, args, model_args: ModelConfig) -> RecipeSetup:
    """The toy testbed's pair (teacher evaluated) when `recipe.testbed` is set, else the real models' names (their
    init kwargs set on `args`) and the dataset."""
    if recipe.testbed is not None:
        return _toy_setup(recipe, args)
    return _real_setup(recipe, args, model_args)


def _model_init_kwargs(model_args: ModelConfig) -> dict:
    """TRL's script pattern: revision, attention and dtype from ModelConfig, plus quantization.

    `trust_remote_code` is a field of the training config in TRL 1.16 (not of ModelConfig); the trainers pass it on.
    """
    kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        from trl import get_kbit_device_map

        kwargs["device_map"] = get_kbit_device_map()
        kwargs["quantization_config"] = quantization_config
    return kwargs


def _real_setup(recipe: RecipeArguments, args, model_args: ModelConfig) -> RecipeSetup:
    args.model_init_kwargs = {**_model_init_kwargs(model_args), **(args.model_init_kwargs or {})}
    teacher_kwargs = {"dtype": model_args.dtype}
    args.teacher_model_init_kwargs = {**teacher_kwargs, **(args.teacher_model_init_kwargs or {})}
    if Path(recipe.dataset_name).suffix in (".json", ".jsonl", ".parquet", ".csv"):
        kind = {".jsonl": "json"}.get(Path(recipe.dataset_name).suffix, Path(recipe.dataset_name).suffix[1:])
        data = load_dataset(kind, data_files=recipe.dataset_name, split=recipe.dataset_train_split)
    else:
        data = load_dataset(recipe.dataset_name, recipe.dataset_config, split=recipe.dataset_train_split)
    return RecipeSetup(
        student=model_args.model_name_or_path,
        teacher=getattr(args, "teacher_model_name_or_path", None),
        tokenizer=None,
        train_dataset=data,
        peft_config=get_peft_config(model_args),
    )


def _toy_setup(recipe: RecipeArguments, args) -> RecipeSetup:
    from trl_opd import testbed
    from trl_opd.testbed.training import load_pretrained

    prepared = testbed.prepare(recipe.testbed, seed=recipe.testbed_seed)
    teacher, teacher_tokenizer = load_pretrained(prepared["teacher"])  # its own tokenizer in a SimCT setting
    student_path = prepared["student"]
    if recipe.testbed_student == "context_literate":
        from trl_opd.testbed.context import context_literate_student

        student_path = context_literate_student(prepared["task"], seed=recipe.testbed_seed, show_progress=True)
    student, tokenizer = load_pretrained(student_path)
    student.train()
    data = testbed.make_dataset(recipe.testbed_train_size, prepared["task"], seed=args.seed)
    eval_problems = testbed.heldout_problems(prepared["task"])[: recipe.testbed_eval_size]
    setup = RecipeSetup(student, teacher, tokenizer, data, eval_problems=eval_problems)
    setup.evaluate("teacher", teacher, teacher_tokenizer)
    if recipe.serve_teacher:
        _serve_toy_teacher(prepared["teacher"], args)
    if getattr(args, "served_teacher", False):
        setup.teacher = None  # the trainer asks the server (started here, or by hand) instead
    return setup


def _serve_toy_teacher(teacher_dir, args) -> None:
    """Start `trl-opd serve-teacher` on the testbed teacher (a free loopback port, stopped at exit) and point the
    config at it; its checks run again with the server set."""
    import socket
    import subprocess
    import sys

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("serve_teacher starts one server for a one-process toy run; with several processes start "
                         "`trl-opd serve-teacher` yourself and set teacher_model_server_url.")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "trl_opd.cli", "serve-teacher", str(teacher_dir), "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--device", "cpu"]
    server = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
    atexit.register(server.terminate)
    args.teacher_model_name_or_path = None
    args.teacher_model_server_url = f"http://127.0.0.1:{port}"
    args.teacher_server_backend = "trl_opd"
    args.teacher_server_wait_seconds = max(args.teacher_server_wait_seconds, 120.0)  # the server is starting
    args.validate_served_teacher_arguments()
    print(f"[trl_opd] serving the toy teacher at {args.teacher_model_server_url} (pid {server.pid})", flush=True)


def save_run(trainer) -> None:
    """Save the model and the trainer state (`trainer_state.json`: the run's logged losses and metrics) to the
    run's `output_dir`, and plot the OPD diagnostics there when `diagnostics_steps` is on."""
    output_dir = trainer.args.output_dir
    trainer.save_model(output_dir)
    trainer.save_state()
    if getattr(trainer.args, "diagnostics_steps", 0) and trainer.accelerator.is_main_process:
        from trl_opd.diagnostics import plot_diagnostics

        plot_diagnostics(trainer.state.log_history, f"{output_dir}/diagnostics")
