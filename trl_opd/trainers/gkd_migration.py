"""Migrating from `trl.experimental.gkd.GKDTrainer`: its `messages` datasets and its configuration fields.

* `messages_to_prompt_completion`: a dataset with a `messages` column of whole conversations (GKD's format) becomes
  `prompt` = the conversation before the last turn, `completion` = `[the last turn]`, which must be the assistant's
  (GKD's collator splits at the last message the same way). OPDTrainer calls it on its datasets before any weights
  load; a malformed conversation fails there with its row number.
* `gkd_arguments`: the `OPDConfig` keyword arguments that give GKDConfig's fields their GKD meaning (and defaults).

Differences that remain (README, "Migrating from GKDTrainer"): off-policy completions end at the end-of-turn token
(GKD also trains on whatever the chat template writes after it, e.g. ChatML's newline) and are cut at
`max_completion_length` (GKD cuts the whole sequence at `max_length`, oldest tokens first); the `lmbda` coin is drawn
from (`seed`, step), once per generation batch, rather than from Python's `random` per micro-batch.
"""

from __future__ import annotations

from transformers.utils import logging as hf_logging

from ..losses import divergence_from_trl_beta

logger = hf_logging.get_logger(__name__)

MESSAGES = "messages"


def _check_conversation(name: str, index: int, messages) -> None:
    """A conversation is a list of {role, content} messages, at least two, the last one the assistant's."""
    if not isinstance(messages, list) or not all(
        isinstance(message, dict) and isinstance(message.get("role"), str) and message.get("content") is not None
        for message in messages
    ):
        raise ValueError(
            f"Row {index} of `{name}` has the `messages` value {str(messages)[:120]!r}: a conversation is a list of "
            "messages like {'role': 'user', 'content': '...'}."
        )
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        roles = [message["role"] for message in messages]
        raise ValueError(
            f"Row {index} of `{name}` has a conversation with the roles {roles}. OPDTrainer (like GKDTrainer) trains "
            "on the last message as the completion of the messages before it, so a conversation needs at least one "
            "message before a final 'assistant' message. Drop or trim such rows, e.g. "
            "`dataset.filter(lambda row: len(row['messages']) > 1 and row['messages'][-1]['role'] == 'assistant')`."
        )


def _split(row: dict, index: int, name: str) -> dict:
    messages = row[MESSAGES]
    _check_conversation(name, index, messages)
    return {"prompt": messages[:-1], "completion": [messages[-1]]}


def messages_to_prompt_completion(dataset, name: str = "train_dataset"):
    """`dataset` with a `messages` column and no `prompt` column as `prompt`/`completion` conversations (the
    `messages` column dropped); any other dataset unchanged. With both `prompt` and `messages`, `prompt` is used and
    `messages` ignored (a warning says so). A `datasets.Dataset` is converted and checked now; an
    `IterableDataset` lazily (a malformed row fails when it is read)."""
    columns = getattr(dataset, "column_names", None)
    if dataset is None or columns is None or MESSAGES not in columns:
        return dataset
    if "prompt" in columns:
        logger.warning(
            "`%s` has both a 'prompt' and a 'messages' column: OPDTrainer uses 'prompt' (and 'completion' for "
            "off-policy batches) and ignores 'messages'. Drop 'prompt' to train on the conversations GKD-style.", name
        )
        return dataset
    if "completion" in columns:
        raise ValueError(
            f"`{name}` has a 'messages' and a 'completion' column but no 'prompt' column. OPDTrainer splits each "
            "conversation into a prompt and a completion (its last, assistant message); drop or rename 'completion'."
        )
    if hasattr(dataset, "__len__"):  # a map-style dataset: check every row before anything is loaded
        for index, messages in enumerate(dataset[MESSAGES]):
            _check_conversation(name, index, messages)
    return dataset.map(_split, with_indices=True, fn_kwargs={"name": name}, remove_columns=[MESSAGES])


def conversations_to_prompts(train_dataset, eval_dataset):
    """`messages_to_prompt_completion` on the training set and on every evaluation set (one, or a dict of them)."""
    train_dataset = messages_to_prompt_completion(train_dataset, "train_dataset")
    if isinstance(eval_dataset, dict):
        return train_dataset, {key: messages_to_prompt_completion(data, f"eval_dataset[{key!r}]")
                               for key, data in eval_dataset.items()}
    return train_dataset, messages_to_prompt_completion(eval_dataset, "eval_dataset")


def gkd_arguments(
    *,
    temperature: float = 0.9,
    lmbda: float = 0.5,
    beta: float = 0.5,
    max_new_tokens: int = 128,
    seq_kd: bool = False,
    disable_dropout: bool = True,
) -> dict:
    """`OPDConfig` keyword arguments equivalent to these `GKDConfig` fields (GKD's defaults):

    * `temperature` samples the completions; GKD's loss reads the logits at temperature 1, hence
      `distillation_temperature=1.0`;
    * `beta` picks the divergence as in GKD (0: forward KL, 1: reverse KL, otherwise the generalized JSD with that
      teacher weight): `divergence=divergence_from_trl_beta(beta)`, `beta=beta`;
    * `max_new_tokens` is `max_completion_length`; `lmbda`, `seq_kd`, `disable_dropout` keep their names.

    GKD's loss is the sum over completion tokens divided by the step's completion tokens: OPDConfig's default
    `loss_reduction="token_mean"`. Use as `OPDConfig(output_dir=..., **gkd_arguments(lmbda=0.5, beta=0.5))`.
    """
    return {
        "temperature": temperature,
        "distillation_temperature": 1.0,
        "lmbda": lmbda,
        "seq_kd": seq_kd,
        "divergence": divergence_from_trl_beta(beta),
        "beta": beta,
        "max_completion_length": max_new_tokens,
        "disable_dropout": disable_dropout,
        "loss_reduction": "token_mean",
    }
