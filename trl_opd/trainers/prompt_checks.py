"""Checks on the training prompts that run before any weights are loaded (OPDTrainer, SimCTTrainer, RLADTrainer).

A prompt that is empty, malformed, or too long to leave room for `max_completion_length` tokens in the models'
context would otherwise fail (or silently run past the trained context) at some step hours into a run.
"""

from __future__ import annotations

import difflib

from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from .teacher import model_config

logger = hf_logging.get_logger(__name__)


def text_tokenizer(processing_class):
    """The tokenizer of a processor (VLM), the tokenizer itself, or None."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    return tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else None


ROLES = ("system", "developer", "user", "assistant", "tool", "ipython", "function")
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content", "thinking")
_FORM = "A prompt is a non-empty string or a non-empty list of messages like {'role': 'user', 'content': '...'}."


def check_prompt_form(index: int, prompt) -> None:
    """A prompt is a non-empty string or a non-empty list of {role, content} messages with known roles."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(
                f"Row {index} of `train_dataset` has an empty prompt; drop it, e.g. "
                "`dataset.filter(lambda row: row['prompt'].strip() != '')`."
            )
        return
    if not (isinstance(prompt, list) and len(prompt) > 0 and all(isinstance(message, dict) for message in prompt)):
        raise ValueError(
            f"Row {index} of `train_dataset` has the prompt {str(prompt)[:120]!r} ({type(prompt).__name__}). {_FORM}"
        )
    for position, message in enumerate(prompt):
        check_message(index, position, message)


def _near(word: str, choices) -> str:
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""


def check_message(index: int, position: int, message: dict) -> None:
    """One message of a conversational prompt: a known role and some content (a misspelled role or key would
    otherwise render as an empty prompt, or be dropped by the chat template, and train on it)."""
    where = f"Row {index} of `train_dataset`, message {position}"
    present = [key for key, value in message.items() if value is not None]
    role = message.get("role")
    if not isinstance(role, str):
        near = next((_near(key, ("role",)) for key in present if key not in MESSAGE_KEYS and _near(key, ("role",))), "")
        raise ValueError(
            f"{where} has no 'role' (keys: {present}).{near} {_FORM} Fix it with "
            "`dataset.map(...)` before training."
        )
    if role not in ROLES:
        raise ValueError(
            f"{where} has the role {role!r}, which chat templates do not know (they render it as nothing or fail)."
            f"{_near(role, ROLES)} The roles are {', '.join(map(repr, ROLES))}; fix the dataset, e.g. "
            f"`dataset.map(lambda row: {{'prompt': [{{**m, 'role': 'user' if m['role'] == {role!r} else m['role']}} "
            "for m in row['prompt']]})`."
        )
    if message.get("content") is None and not message.get("tool_calls"):
        unknown = [key for key in present if key not in MESSAGE_KEYS]
        near = next((_near(key, ("content",)) for key in unknown if _near(key, ("content",))), "")
        raise ValueError(
            f"{where} (role {role!r}) has no 'content' (keys: {present}).{near} {_FORM}"
        )


def check_chat_template(tokenizer, prompts) -> None:
    """Conversational prompts need the student's tokenizer to have a chat template (base models often have none)."""
    if tokenizer is None or not any(isinstance(prompt, list) for prompt in prompts):
        return
    if getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"The training prompts are conversations, but the student's tokenizer ({name}) has no chat template to "
            "render them. Pass `processing_class=` a tokenizer that has one (e.g. the instruct model's), set "
            "`tokenizer.chat_template`, or give plain-string prompts."
        )


def prompt_lengths(tokenizer, prompts, chat_template_kwargs: dict, batch_size: int = 1024) -> list[int] | None:
    """Token counts of the prompts as the trainer will tokenise them (chat template with the generation prompt for
    conversations); None when they cannot be computed here (no chat template: the trainer reports that itself)."""
    lengths = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            if isinstance(batch[0], str):
                ids = tokenizer(text=batch)["input_ids"]
            else:
                ids = tokenizer.apply_chat_template(batch, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, **chat_template_kwargs)["input_ids"]
            lengths.extend(len(row) for row in ids)
    except (ValueError, TypeError, KeyError) as error:
        logger.warning("Could not measure the training prompts' lengths (%s); skipping that check.", error)
        return None
    return lengths


def first_row(data):
    """The first row of an iterable dataset, or None."""
    if data is None:
        return None
    try:
        return next(iter(data))
    except (StopIteration, TypeError):
        return None


def check_prompts(train_dataset, models, tokenizer, args, chat_template_kwargs: dict) -> None:
    """Every prompt of `train_dataset`'s "prompt" column is well formed and, tokenised by the student's `tokenizer`
    (None: the lengths are not checked), leaves room for `args.max_completion_length` tokens in the smallest context
    (`max_position_embeddings`) of `models`, a list of `(model, revision)` pairs (a model is a module or a path/Hub
    id; the revision is None for a module or the default).

    Reads the whole prompt column and tokenises it once (seconds per 10k prompts). Datasets without a "prompt"
    column (iterable datasets, custom collators) are not checked.
    """
    columns = getattr(train_dataset, "column_names", None)
    if columns is None:  # an iterable dataset: its first row only
        first = first_row(train_dataset)
        if isinstance(first, dict) and "prompt" in first:
            check_prompt_form(0, first["prompt"])
            check_chat_template(tokenizer, [first["prompt"]])
        return
    if "prompt" not in columns:
        return
    prompts = train_dataset["prompt"]
    for index, prompt in enumerate(prompts):
        check_prompt_form(index, prompt)
    check_chat_template(tokenizer, prompts)
    configs = [model_config(model, args, revision) for model, revision in models]
    limits = [getattr(c.get_text_config(), "max_position_embeddings", None) for c in configs]
    limits = [limit for limit in limits if isinstance(limit, int) and limit > 0]
    if tokenizer is None or not limits or args.max_completion_length is None:
        return
    context = min(limits)
    room = context - args.max_completion_length
    if room < 1:
        raise ValueError(
            f"max_completion_length={args.max_completion_length} leaves no room for a prompt in the models' "
            f"context of {context} positions (`max_position_embeddings`); lower max_completion_length."
        )
    lengths = prompt_lengths(tokenizer, prompts, chat_template_kwargs)
    if lengths is None:
        return
    too_long = [index for index, length in enumerate(lengths) if length > room]
    if too_long:
        first = too_long[0]
        raise ValueError(
            f"{len(too_long)} of {len(lengths)} training prompts are too long: with "
            f"max_completion_length={args.max_completion_length} a prompt may have at most {room} tokens in the "
            f"models' context of {context} positions (`max_position_embeddings`), but row {first} has "
            f"{lengths[first]}. Drop or shorten them, e.g. "
            f"`dataset.filter(lambda row: len(tokenizer(row['prompt']).input_ids) <= {room})`, or lower "
            "max_completion_length."
        )
