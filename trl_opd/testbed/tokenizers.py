"""Tokenizers for the testbed, built in code (no Hub): one token per character, or a byte-level BPE.

Both share the special tokens ``<pad>``, ``<eos>`` and the ChatML markers ``<|im_start|>`` /
``<|im_end|>``, have no BOS, pad on the left (batched generation), carry a minimal ChatML chat
template (so conversational prompts work too; the task itself uses plain-string prompts), and
round-trip through ``save_pretrained`` / ``AutoTokenizer.from_pretrained``. They split the task's
text differently (``"122"`` is three character tokens but one or two BPE tokens), which is what a
cross-tokenizer (SimCT / ULD) teacher-student pair needs.
"""

from __future__ import annotations

import string
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Printable ASCII (letters, digits, punctuation, space) and newline: the task's characters plus whatever a
# chat template or an OPSD privileged-context template writes, so decode(encode(text)) == text for such text.
CHARACTERS = string.digits + string.ascii_letters + string.punctuation + " \n"


def _wrap(backend: Tokenizer, **special_tokens) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
        padding_side="left",
        truncation_side="left",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
        **special_tokens,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def char_tokenizer(characters: str = CHARACTERS) -> PreTrainedTokenizerFast:
    """One token per character: a WordLevel vocabulary over ``characters`` plus the special tokens.

    Ids: ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, ``<|im_start|>`` 3, ``<|im_end|>`` 4, then ``characters`` in order.
    The pre-tokenizer isolates every character with ``Split(Regex("[\\s\\S]"), "isolated")``: the plain
    ``Regex(".")`` does not match a newline, which would turn ``"\\n\\n"`` into one unknown piece.
    """
    if len(set(characters)) != len(characters):
        raise ValueError("characters must not repeat: each character gets exactly one token id.")
    specials = [PAD, EOS, UNK, IM_START, IM_END]
    vocab = {token: index for index, token in enumerate(specials + list(characters))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    return _wrap(backend, unk_token=UNK)


def bpe_tokenizer(texts: Iterable[str], vocab_size: int = 400, split_words: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style pre-tokenisation) trained on ``texts``, e.g. ``task.corpus(cfg)``.

    Byte-level: any text encodes without ``<unk>``. Ids 0-3 are ``<pad>``, ``<eos>``, ``<|im_start|>``,
    ``<|im_end|>``; ``vocab_size`` counts the 256 byte tokens, the specials and the learned merges.
    Training is deterministic for the same texts.

    ``split_words=True`` isolates every digit and every whitespace character before the byte-level split, so BPE
    merges only letters and punctuation (``Compute``, ``boxed``): numbers are written digit by digit (as Qwen's and
    Mistral's tokenizers do) and a space is always its own token. Measured reasons (bench/results/simct_testbed.md):
    with merged numbers (``"92"`` one token here, ``"9"`` + ``"2"`` there) a 2-layer teacher was at 6% after 500 of
    its 1,200 steps; with spaces merged into the next piece (``"Ġ\\"``) a character-level student distilled by
    SimCT never learns to write `` \boxed{``, because the teacher, scored on a lone ``"Ġ"``, has only ever seen a
    digit after it.
    """
    specials = [PAD, EOS, IM_START, IM_END]
    minimum = 256 + len(specials)
    if vocab_size <= minimum:
        raise ValueError(f"vocab_size must exceed {minimum} (bytes + special tokens) to learn any merge.")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_words:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(Regex(r"\s"), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer)
    return _wrap(backend)


TOKENIZER_KINDS = ("char", "bpe", "bpe_words")


def task_tokenizer(kind: str, task_cfg=None) -> PreTrainedTokenizerFast:
    """``"char"`` -> ``char_tokenizer()``; ``"bpe"`` -> ``bpe_tokenizer(task.corpus(task_cfg))``; ``"bpe_words"``
    -> the same with ``split_words=True``."""
    if kind == "char":
        return char_tokenizer()
    if kind in ("bpe", "bpe_words"):
        from trl_opd.testbed.task import TaskConfig, corpus

        return bpe_tokenizer(corpus(task_cfg or TaskConfig()), split_words=kind == "bpe_words")
    raise ValueError(f"tokenizer kind must be one of {TOKENIZER_KINDS}, got {kind!r}.")
