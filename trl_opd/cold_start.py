r"""Off-policy cold start before OPD (methods.md §7.3, arXiv 2604.13016 §5): the teacher answers the
prompts, the unusable answers are dropped, and TRL's ``SFTTrainer`` trains the student on the rest; OPD then
starts from the SFT checkpoint on the remaining prompts (deduplicated against the SFT ones).

Pieces (each usable alone; ``recipes/cold_start.py`` chains them):

* :func:`split_prompts`: the first ``n`` rows for the cold start, the rest (minus exact duplicates) for OPD.
* :func:`generate_teacher_completions`: one sampled teacher answer per prompt (paper: T 0.7, top-p 0.95), with
  whether it finished (EOS) within ``max_new_tokens``; :func:`teacher_answers` runs it across processes.
* :func:`filter_completions`: drops *truncated* answers (no EOS), *degenerate* ones (repetition loops, see
  :func:`repeated_ngram_share`) and *wrong* ones (the grader says the final answer is not the reference).
* :func:`sft_config` / :func:`cold_start_sft`: ``SFTConfig`` from an ``OPDConfig`` plus
  :class:`ColdStartArguments`, and the SFT run itself.

Decisions (the paper is silent): degeneracy = at least ``max_repeated_ngram_share`` (0.5) of the
whitespace-word n-grams (n = 10) repeat an earlier n-gram of the same answer; the grader is
``trl_opd.eval.grade_many`` (Math-Verify, ``\boxed{}``) unless one is passed; a row without a reference answer
is an error while ``require_correct=True``. The SFT phase is full-parameter (the paper's choice): a
``peft_config`` applies to the OPD phase only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

FILTER_REASONS = ("truncated", "degenerate", "wrong")


@dataclass
class ColdStartArguments:
    """The cold-start phase of ``recipes/cold_start.py`` (paper values in brackets, methods.md §7.3).

    The SFT phase reuses the OPD config's batch size, gradient accumulation, precision, seed, logging and
    reporting settings; the fields below set what differs.
    """

    cold_start_num_prompts: int = field(
        default=2000,
        metadata={"help": "Prompts (the first rows of the training data) answered by the teacher."},
    )
    cold_start_temperature: float = field(
        default=0.7, metadata={"help": "Teacher sampling temperature [0.7]."}
    )
    cold_start_top_p: float = field(default=0.95, metadata={"help": "Teacher nucleus sampling [0.95]."})
    cold_start_max_new_tokens: int = field(
        default=12288,
        metadata={"help": "Teacher answer budget; an answer without EOS is truncated [12,288]."},
    )
    cold_start_generation_batch_size: int = field(
        default=64, metadata={"help": "Prompts per generate() call."}
    )
    cold_start_ngram_size: int = field(
        default=10, metadata={"help": "Word n-gram size of the repetition filter."}
    )
    cold_start_max_repeated_ngram_share: float = field(
        default=0.5, metadata={"help": "Drop answers whose share of repeated n-grams reaches this (0, 1]."}
    )
    cold_start_require_correct: bool = field(
        default=True, metadata={"help": "Drop answers the grader marks wrong (needs an 'answer' column)."}
    )
    cold_start_learning_rate: float = field(default=1e-5, metadata={"help": "SFT learning rate [1e-5]."})
    cold_start_num_train_epochs: float = field(default=1.0, metadata={"help": "SFT epochs [1]."})
    cold_start_max_steps: int = field(
        default=-1, metadata={"help": "SFT steps; overrides the epochs when > 0."}
    )
    cold_start_lr_scheduler_type: str = field(default="cosine", metadata={"help": "SFT schedule [cosine]."})
    cold_start_warmup_steps: float = field(
        default=0.05,
        metadata={"help": "SFT warm-up: steps, or a float in [0, 1) for a share of the steps [0.05]."},
    )

    def __post_init__(self):
        if self.cold_start_num_prompts < 1:
            raise ValueError(f"cold_start_num_prompts must be >= 1, got {self.cold_start_num_prompts}.")
        if self.cold_start_temperature < 0:
            raise ValueError(
                f"cold_start_temperature must be >= 0 (0 = greedy), got {self.cold_start_temperature}."
            )
        if not 0 < self.cold_start_top_p <= 1:
            raise ValueError(f"cold_start_top_p must be in (0, 1], got {self.cold_start_top_p}.")
        if self.cold_start_max_new_tokens < 1 or self.cold_start_generation_batch_size < 1:
            raise ValueError("cold_start_max_new_tokens and cold_start_generation_batch_size must be >= 1.")
        _check_repetition_settings(self.cold_start_ngram_size, self.cold_start_max_repeated_ngram_share)


def _check_repetition_settings(ngram_size: int, max_share: float) -> None:
    if ngram_size < 1:
        raise ValueError(f"The repetition filter's n-gram size must be >= 1, got {ngram_size}.")
    if not 0 < max_share <= 1:
        raise ValueError(
            f"The repetition filter's max repeated n-gram share must be in (0, 1], got {max_share}."
        )


# ------------------------------------------------------------------------------------------- prompts


def _prompt_key(prompt) -> str:
    """Exact-match identity of a plain or conversational prompt."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def split_prompts(dataset, num_cold_start: int):
    """``(cold_start_rows, opd_rows)``: the first ``num_cold_start`` rows, and the other rows whose prompt is
    not among them (exact match), so OPD never trains on a prompt the SFT phase saw."""
    if "prompt" not in dataset.column_names:
        raise ValueError(f"The dataset needs a 'prompt' column, got {dataset.column_names}.")
    if not 0 < num_cold_start < len(dataset):
        raise ValueError(
            f"num_cold_start must be in [1, {len(dataset) - 1}] so that both phases get prompts "
            f"(the dataset has {len(dataset)} rows), got {num_cold_start}."
        )
    cold = dataset.select(range(num_cold_start))
    seen = {_prompt_key(prompt) for prompt in cold["prompt"]}
    rest = dataset.select(range(num_cold_start, len(dataset)))
    return cold, rest.filter(lambda row: _prompt_key(row["prompt"]) not in seen)


# ------------------------------------------------------------------------------------------- generation


def _generation_eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


@torch.no_grad()
def generate_teacher_completions(
    teacher,
    tokenizer,
    prompts: Sequence,
    *,
    max_new_tokens: int,
    temperature: float = 0.7,
    top_p: float = 0.95,
    batch_size: int = 64,
    seed: int = 0,
) -> list[dict]:
    """One teacher answer per prompt: ``[{"prompt", "completion", "finished"}]`` in the order of ``prompts``.

    Plain prompts are used as they are; conversational ones go through the chat template (generation prompt
    added) and get a conversational completion ``[{"role": "assistant", "content": ...}]``. ``finished`` is
    True when the answer ended with an EOS token within ``max_new_tokens``. ``temperature=0`` is greedy.
    """
    eos_ids = _generation_eos_ids(teacher, tokenizer)
    padding_side, tokenizer.padding_side = (
        tokenizer.padding_side,
        "left",
    )  # batched generation needs left padding
    was_training = teacher.training
    teacher.eval()
    torch.manual_seed(seed)
    records = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch_prompts = list(prompts[start : start + batch_size])
            records += _generate_batch(
                teacher, tokenizer, batch_prompts, eos_ids, max_new_tokens, temperature, top_p
            )
    finally:
        tokenizer.padding_side = padding_side
        teacher.train(was_training)
    return records


def _generate_batch(teacher, tokenizer, prompts, eos_ids, max_new_tokens, temperature, top_p) -> list[dict]:
    texts = [
        p
        if isinstance(p, str)
        else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(teacher.device)
    sampling = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    output = teacher.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=sorted(eos_ids),
        **sampling,
    )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    finished = torch.isin(new_tokens, torch.tensor(sorted(eos_ids), device=new_tokens.device)).any(dim=1)
    completions = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [
        {
            "prompt": prompt,
            "completion": text if isinstance(prompt, str) else [{"role": "assistant", "content": text}],
            "finished": bool(done),
        }
        for prompt, text, done in zip(prompts, completions, finished.tolist())
    ]


def teacher_answers(teacher, tokenizer, rows, cold: ColdStartArguments, seed: int = 0) -> list[dict]:
    """``generate_teacher_completions`` on the ``prompt`` column of ``rows``, split across the processes of a
    distributed launch and gathered back in order, with each row's ``answer`` (None without that column)
    attached. Every process returns the full list. Process ``i`` samples with seed ``seed + i``."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    with state.split_between_processes(list(rows["prompt"])) as shard:
        local = generate_teacher_completions(
            teacher.to(state.device),
            tokenizer,
            shard,
            max_new_tokens=cold.cold_start_max_new_tokens,
            temperature=cold.cold_start_temperature,
            top_p=cold.cold_start_top_p,
            batch_size=cold.cold_start_generation_batch_size,
            seed=seed + state.process_index,
        )
    records = gather_object(local) if state.num_processes > 1 else local
    answers = rows["answer"] if "answer" in rows.column_names else [None] * len(records)
    return [{**record, "answer": answer} for record, answer in zip(records, answers)]


# ------------------------------------------------------------------------------------------- filtering


def repeated_ngram_share(text: str, n: int = 10) -> float:
    """Share of the whitespace-word n-grams of ``text`` that repeat an earlier n-gram of it (0 for < n words).

    A looping answer ("x y z x y z x y z ...") tends to 1; ordinary prose and worked solutions stay near 0.
    """
    words = text.split()
    count = len(words) - n + 1
    if count <= 0:
        return 0.0
    distinct = {tuple(words[i : i + n]) for i in range(count)}
    return 1.0 - len(distinct) / count


def _completion_text(completion) -> str:
    return completion if isinstance(completion, str) else "".join(m["content"] for m in completion)


def _default_grader(completions: list[str], answers: list) -> list[bool]:
    from trl_opd.eval.grading import grade_many

    return [result.correct for result in grade_many(completions, answers)]


def filter_completions(
    records: Sequence[dict],
    *,
    grader: Callable[[str, Any], bool] | None = None,
    require_correct: bool = True,
    ngram_size: int = 10,
    max_repeated_ngram_share: float = 0.5,
) -> tuple[list[dict], dict[str, int]]:
    """Keep the teacher answers worth imitating; returns ``(kept, counts)``.

    Args:
        records: dicts with ``completion`` (text or conversational), ``finished`` (bool) and, when
            ``require_correct``, ``answer`` (the reference final answer).
        grader: ``(completion_text, answer) -> bool``; default ``trl_opd.eval.grade_many`` (Math-Verify,
            batched).
        require_correct: also drop answers the grader marks wrong.
        ngram_size, max_repeated_ngram_share: an answer is degenerate when
            ``repeated_ngram_share(text, ngram_size) >= max_repeated_ngram_share``.

    Returns:
        ``kept`` (the surviving records, in order) and ``counts`` with ``total``, ``kept`` and the number
        dropped for each reason, checked in the order truncated, degenerate, wrong (each record counts once,
        for the first).
    """
    _check_repetition_settings(ngram_size, max_repeated_ngram_share)
    counts = {"total": len(records), **{reason: 0 for reason in FILTER_REASONS}}
    candidates = []
    for record in records:
        if not record["finished"]:
            counts["truncated"] += 1
        elif (
            repeated_ngram_share(_completion_text(record["completion"]), ngram_size)
            >= max_repeated_ngram_share
        ):
            counts["degenerate"] += 1
        else:
            candidates.append(record)
    if require_correct and candidates:
        correct = _grade(candidates, grader)
        counts["wrong"] = correct.count(False)
        candidates = [record for record, ok in zip(candidates, correct) if ok]
    counts["kept"] = len(candidates)
    return candidates, counts


def _grade(records: list[dict], grader) -> list[bool]:
    missing = sum(record.get("answer") is None for record in records)
    if missing:
        raise ValueError(
            f"{missing} of {len(records)} records have no 'answer' to grade against. Add an 'answer' column "
            "with the reference final answers, or pass require_correct=False to keep answers without grading."
        )
    texts = [_completion_text(record["completion"]) for record in records]
    answers = [record["answer"] for record in records]
    if grader is None:
        return _default_grader(texts, answers)
    return [bool(grader(text, answer)) for text, answer in zip(texts, answers)]


# ------------------------------------------------------------------------------------------- SFT


def sft_config(opd_args, cold: ColdStartArguments, output_dir: str):
    """``trl.SFTConfig`` for the cold start: the OPD config's batch, precision, seed and logging settings,
    with the cold-start learning rate, schedule, warm-up and length; loss on the completion only."""
    from trl import SFTConfig

    shared = (
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "use_cpu",
        "bf16",
        "fp16",
        "seed",
        "logging_steps",
        "report_to",
        "activation_checkpointing",
        "max_grad_norm",
        "disable_tqdm",
    )
    return SFTConfig(
        output_dir=output_dir,
        learning_rate=cold.cold_start_learning_rate,
        num_train_epochs=cold.cold_start_num_train_epochs,
        max_steps=cold.cold_start_max_steps,
        lr_scheduler_type=cold.cold_start_lr_scheduler_type,
        warmup_steps=cold.cold_start_warmup_steps,
        completion_only_loss=True,
        save_strategy="no",
        **{name: getattr(opd_args, name) for name in shared},
    )


def cold_start_sft(student, tokenizer, kept: Sequence[dict], args):
    """Train ``student`` (a model or a path) with TRL's SFTTrainer on the kept teacher answers; returns the
    trainer."""
    from datasets import Dataset
    from trl import SFTTrainer

    if not kept:
        raise ValueError(
            "Every teacher answer was filtered out: nothing to fine-tune on. Raise "
            "cold_start_max_new_tokens, check the grader and the 'answer' column, or set "
            "cold_start_require_correct=False."
        )
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in kept])
    trainer = SFTTrainer(model=student, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    return trainer
