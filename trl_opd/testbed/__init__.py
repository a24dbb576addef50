r"""The offline testbed: a synthetic arithmetic task, tokenizers and tiny models built in code, cached trained models.

Every trl_opd method is shown working here on a CPU in minutes (see ``reference/testbed.md`` for the
measurements behind the defaults).

The task (``task``)::

    prompt:     "Compute 59+63-15.\n"
    completion: "59+63=122. 122-15=107. \boxed{107}"      (the trainer appends EOS)

Typical use (what a recipe does)::

    from trl_opd.testbed import SETTINGS, prepare, load_pretrained, task_stream, heldout_problems, accuracy

    paths = prepare("multistrategy", seed=0)        # builds once (minutes), then a cache hit (< 1 s)
    teacher, tokenizer = load_pretrained(paths["teacher"])
    student, _ = load_pretrained(paths["student"])
    prompts = task_stream(paths["task"], seed=1)     # endless IterableDataset: prompt, completion, answer, ...
    ...                                              # distil student from teacher on prompts
    print(accuracy(student, tokenizer, heldout_problems(paths["task"])))

Task (``trl_opd.testbed.task``):
    ``TaskConfig(num_operations=2, digits=2, allow_subtraction=True, num_strategies=1)``; ``.harder(extra_operations=1,
    extra_digits=0)`` gives the harder out-of-distribution variant.
    ``make_problem(rng, cfg, strategy=None) -> dict(prompt, completion, answer, solution, strategy)``.
    ``make_dataset(n, cfg, seed=0, strategy=None, exclude=None) -> datasets.Dataset`` with those columns
    (``exclude=None`` leaves out the held-out and validation prompts).
    ``task_stream(cfg, seed=0, strategy=None) -> datasets.IterableDataset`` (endless, same exclusion).
    ``heldout_problems(cfg) -> list[dict]``: the fixed 300-problem test set.
    ``validation_problems(cfg) -> list[dict]``: 300 more, used for early stopping.
    ``strategy_pairs(num_terms)``: the ordered pairs that strategies 0, 1, ... add first.

Tokenizers (``trl_opd.testbed.tokenizers``), ``PreTrainedTokenizerFast``, left padding, no BOS, ChatML template:
    ``char_tokenizer()``: one token per character; ``bpe_tokenizer(texts, vocab_size=400, split_words=False)``:
    byte-level BPE (``split_words``: every digit and space its own token); ``task_tokenizer("char" | "bpe" |
    "bpe_words", cfg)``.

Models (``trl_opd.testbed.models``):
    ``ModelSpec(arch="qwen3", hidden=96, layers=2, heads=4, tokenizer="char")``, ``ModelSpec.for_role("student")``
    (2 layers / 64 / 2 heads); ``tiny_config(tokenizer, role="teacher", arch="qwen3", hidden=None, layers=None,
    heads=None) -> PretrainedConfig``; ``tiny_model(tokenizer, config=None, seed=0, **tiny_config_kwargs)``
    (generation config carries EOS and pad).

Training (``trl_opd.testbed.training``):
    ``sft(model, tokenizer, train_dataset, *, steps, batch_size=64, learning_rate=3e-3, warmup_steps=50,
    eval_problems=None, eval_every=0, target_accuracy=None, seed=0) -> SFTResult`` (TRL SFTTrainer, CPU).
    ``TrainSpec`` (the SFT recipe, incl. ``target_accuracy`` and the student's ``strategy``).
    ``build_model(role, task=None, model=None, seed=0, cache_dir=None, training=None) -> str``,
    ``build_teacher(...)`` / ``build_student(...)`` (the same with ``role`` given; teacher: uniform strategy
    mix until 98%, student: strategy 0 until the first validation eval >= 15%): directory of a trained,
    cached checkpoint (model + tokenizer +
    ``testbed.json``); cache at ``$TRL_OPD_CACHE`` or ``~/.cache/trl_opd/testbed``, keyed by
    ``cache_key(role, task, model, training, seed)``. ``read_metadata(path) -> dict`` (held-out accuracy,
    history), ``load_pretrained(path) -> (model, tokenizer)``.
    ``heldout_accuracies(prepared) -> {"teacher": float, "student": float}`` (greedy, 300 held-out problems).
    ``distillation_args(output_dir, seed, steps, **overrides) -> dict``: the testbed's OPD settings (batch 32,
    lr 1e-3 constant, T 1, 40 completion tokens, CPU) as config keyword arguments.
    ``SETTINGS`` {"main", "multistrategy", "multistrategy_bpe_teacher", "smoke", "smoke_bpe_teacher"} -> ``Setting(task,
    teacher_training, student_training, teacher_model,
    student_model)``; ``prepare(setting="main", seed=0, cache_dir=None) -> dict(task, teacher, student)``.

Evaluation (``trl_opd.testbed.evaluation``):
    ``accuracy(model, tokenizer, problems, *, batch_size=300, max_new_tokens=None, return_records=False)``
    -> float (or ``(float, records)``): greedy, exact match of the ``\boxed{}`` number.
    ``analyse_answer(prompt, completion) -> dict`` (strategy used, consistency, wrong remaining term) and
    ``strategy_summary(records) -> dict`` for the multi-strategy setting.

Command line: ``python -m trl_opd.testbed --setting main|multistrategy|all [--seed 0] [--threads 1]`` builds and
reports.
"""

from trl_opd.testbed.evaluation import accuracy, analyse_answer, generate_completions, grade_answer, strategy_summary
from trl_opd.testbed.models import ModelSpec, tiny_config, tiny_model
from trl_opd.testbed.task import (
    TaskConfig,
    heldout_problems,
    make_dataset,
    make_problem,
    strategy_pairs,
    task_stream,
    validation_problems,
)
from trl_opd.testbed.tokenizers import bpe_tokenizer, char_tokenizer, task_tokenizer
from trl_opd.testbed.training import (
    SETTINGS,
    Setting,
    SFTResult,
    TrainSpec,
    build_model,
    build_student,
    build_teacher,
    cache_key,
    distillation_args,
    heldout_accuracies,
    load_pretrained,
    prepare,
    read_metadata,
    sft,
)

__all__ = [
    "SETTINGS",
    "ModelSpec",
    "SFTResult",
    "Setting",
    "TaskConfig",
    "TrainSpec",
    "accuracy",
    "analyse_answer",
    "bpe_tokenizer",
    "build_model",
    "build_student",
    "build_teacher",
    "cache_key",
    "distillation_args",
    "char_tokenizer",
    "generate_completions",
    "grade_answer",
    "heldout_accuracies",
    "heldout_problems",
    "load_pretrained",
    "make_dataset",
    "make_problem",
    "prepare",
    "read_metadata",
    "sft",
    "strategy_pairs",
    "strategy_summary",
    "task_stream",
    "task_tokenizer",
    "tiny_config",
    "tiny_model",
    "validation_problems",
]
