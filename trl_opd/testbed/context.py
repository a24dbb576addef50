"""A context-literate student for self-distillation (OPSD, PW-OPSD, EDGE-OPD) on the testbed.

OPSD's teacher is the student itself reading a worked solution in its prompt. The papers' students are pretrained
LLMs that follow such an instruction; the testbed's cached student has only ever seen bare problems and cannot use
a solution it is shown (1% accuracy with it). This student can: the testbed's student recipe (2 layers, width 64,
strategy 0, stopped at the first validation evaluation >= 15% on bare prompts), with half of its SFT prompts
showing the solution through ``CONTEXT_TEMPLATE``. It reaches ~100% with the solution shown and ~15% without, so
self-distillation has a real teacher signal to transfer.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from trl_opd.testbed.models import ModelSpec, config_from_spec, tiny_model
from trl_opd.testbed.task import TaskConfig, derive_seed, task_stream, validation_problems
from trl_opd.testbed.tokenizers import task_tokenizer
from trl_opd.testbed.training import build_cache_entry, default_cache_dir, sft

# Only testbed characters, so the character tokenizer encodes it exactly. Use it as `teacher_prompt_template`.
CONTEXT_TEMPLATE = "Solution: {solution}\n{problem}"
CONTEXT_SHARE = 0.5
SFT_FILE = "sft.json"
# The testbed's student recipe, spelled out so that the cache key does not move when the testbed's defaults do.
CONTEXT_STUDENT_SFT = {"steps": 3000, "batch_size": 64, "learning_rate": 3e-3, "warmup_steps": 50, "eval_every": 20,
                       "target_accuracy": 0.15, "strategy": 0}


def with_context(problem: dict, template: str = CONTEXT_TEMPLATE) -> dict:
    """The problem with its worked solution shown through ``template`` (what the OPSD teacher sees)."""
    from trl_opd.trainers.self_distillation import render_teacher_prompt

    return {**problem, "prompt": render_teacher_prompt(template, problem["prompt"], problem["solution"])}


def _mixed_context(problem: dict) -> dict:
    shown = derive_seed("context", problem["prompt"]) % 1000 < CONTEXT_SHARE * 1000
    return with_context(problem) if shown else problem


def context_literate_student(task: TaskConfig, seed: int = 0, cache_dir=None, show_progress: bool = False) -> str:
    """Directory of the context-literate student for ``task`` (trained on first use, minutes; then cached)."""
    spec = ModelSpec.for_role("student")
    key = derive_seed("context-student", CONTEXT_TEMPLATE, CONTEXT_SHARE, asdict(task), asdict(spec),
                      CONTEXT_STUDENT_SFT, seed)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def write(staging: Path) -> None:
        tokenizer = task_tokenizer(spec.tokenizer, task)
        model = tiny_model(tokenizer, config_from_spec(spec, tokenizer), seed=seed)
        recipe = dict(CONTEXT_STUDENT_SFT)
        stream = task_stream(task, seed=seed, strategy=recipe.pop("strategy")).map(_mixed_context)
        result = sft(model, tokenizer, stream, eval_problems=validation_problems(task), seed=seed,
                     show_progress=show_progress, **recipe)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / SFT_FILE).write_text(json.dumps({"steps": result.steps, "evaluations": result.evaluations}))

    # Complete once its last file exists: the rename into place makes every file appear at once.
    return build_cache_entry(root / f"context-student-{key:016x}", lambda entry: (entry / SFT_FILE).exists(), write)
