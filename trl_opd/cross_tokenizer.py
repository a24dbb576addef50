"""Cross-tokenizer distillation pieces: alignment, shared vocabulary, SimCT rows and the ULD baseline.

Everything here is pure (methods.md §8): tokenizers and tensors in, arrays and tensors out, no trainer state.

Alignment
    :func:`align_tokens` (the DESIGN contract) and :func:`align_offsets` split two tokenisations of one text
    into the *finest* common segments: a segment closes wherever both tokenisations have a token boundary at
    the same UTF-8 byte. Offsets come from the fast tokenizers (``return_offsets_mapping``), converted to
    byte positions; characters that a byte-level BPE or SentencePiece byte fallback splits into several
    tokens (whose character offsets overlap) are re-split at byte granularity from the tokens' byte
    lengths, or kept whole when that is impossible. Everything is vectorised (numpy) and linear in the text
    length; no token is decoded on its own (per-token ``decode`` breaks multi-byte characters, TRL #4393).

SimCT (arXiv 2605.07711, §8.1-8.2)
    :func:`align_texts` adds the EOS pair and the *anchors* (1:1 segments whose two tokens spell the same
    bytes); :func:`simct_segments` folds the finest segments into SimCT's segments (a run of non-anchor
    segments plus the anchor that closes it); :func:`shared_vocabulary` gives V∩; :func:`simct_loss` builds
    one row per segment over V∩ plus the span column and takes the reverse KL.

ULD / GOLD (§8.5)
    :func:`uld_loss`: merged distributions per segment, sorted-probability L1 (TRL GOLD's ``ULDLoss``).

Typical trainer use (one optimizer micro-batch)::

    texts = student_tokenizer.batch_decode(completion_ids_without_eos, skip_special_tokens=True,
                                           clean_up_tokenization_spaces=False)   # decode once
    alignments = align_texts(texts, student_tokenizer, teacher_tokenizer, append_eos=True)  # re-encode both
    # build [prompt ‖ a.student_ids] and [teacher prompt ‖ a.teacher_ids] inputs, run both models and slice
    # the completion logits so that position k predicts completion token k (methods.md §0.8)
    groups = [simct_segments(a.segments, a.anchors) for a in alignments]
    loss_rows = simct_loss(student_logits, teacher_logits, student_ids, teacher_ids, stack_segments(groups),
                           shared_vocabulary(student_tokenizer, teacher_tokenizer))   # [G] per segment

Re-encoding is SimCT's own choice (the response *text* is tokenised by both sides), so the student is scored
on the canonical tokenisation of its sample. To keep the sampled ids instead, use
:func:`byte_offsets_from_ids` for the student side and :func:`encode_with_offsets` for the teacher, then
:func:`align_offsets`.
"""

from __future__ import annotations

import functools
import hashlib
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .losses import _weighted_log_ratio
from .reduction import REDUCTIONS, segment_units, unit_coefficients

SHARED_VOCAB_MODES = ("raw", "decoded")
SPAN_SCORES = ("logit_mean", "logprob_mean")
ULD_MERGES = ("observed", "bayesian")
LOSS_REDUCTIONS = ("none", "sum", "token_mean")

# The reference fills absent span columns with -1e9: exp() underflows to exactly 0, so the column drops out of
# the softmax, the KL and the gradient exactly, without the NaN that -inf - (-inf) would give.
_ABSENT_COLUMN = -1e9
_BYTE_FALLBACK_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# ---------------------------------------------------------------------------------------------------------
# Token bytes: what each token id spells, per tokenizer (cached)
# ---------------------------------------------------------------------------------------------------------


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's reversible byte -> printable character map, inverted (character -> byte)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    characters = list(printable)
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + shift)
            shift += 1
    return {chr(character): byte for byte, character in zip(printable, characters)}


_BYTE_OF_CHARACTER = _byte_level_alphabet()


@dataclass(frozen=True)
class TokenTable:
    """What every id of one tokenizer spells. Built once per tokenizer by :func:`token_table`.

    Attributes:
        fingerprint: sha256 of the pieces, the kind, the special ids and the EOS id (the cache key of pairs).
        kind: ``"byte_level"`` (GPT-2 byte alphabet), ``"metaspace"`` (SentencePiece ``▁``) or ``"plain"``.
        token_bytes: per id, the UTF-8 bytes the token stands for (``None`` for special tokens).
        byte_lengths: ``int64 [V]``, ``len(token_bytes[id])`` or -1 for special tokens.
        raw_strings: per id, the piece with the byte-level space marker ``Ġ`` mapped to ``▁`` (``None`` for
            special tokens): SimCT's "raw" shared-vocabulary key.
        byte_codes: ``int64 [V]``, equal for two ids (of any tokenizers in this process) iff they spell the
            same bytes; -1 for special tokens. Lets the anchors be found with array comparisons.
        fallback_ids: ids of SentencePiece byte-fallback pieces ``<0xNN>``.
        eos_token_id: the tokenizer's EOS id, or ``None``.
    """

    fingerprint: str
    kind: str
    token_bytes: tuple
    byte_lengths: np.ndarray
    raw_strings: tuple
    byte_codes: np.ndarray
    fallback_ids: frozenset
    eos_token_id: int | None


_TABLES_BY_TOKENIZER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TABLES_BY_FINGERPRINT: dict[str, TokenTable] = {}
_CODE_OF_BYTES: dict[bytes, int] = {}  # interned token bytes, shared by all tokenizers of the process


def _backend(tokenizer):
    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast (Rust `tokenizers`) tokenizer, so it has no character "
            "offsets. Load it with AutoTokenizer.from_pretrained(..., use_fast=True) or from a "
            "tokenizer.json."
        )
    return tokenizer.backend_tokenizer


def _tokenizer_kind(backend) -> str:
    decoder, pre_tokenizer = repr(backend.decoder), repr(backend.pre_tokenizer)
    if "ByteLevel" in decoder or "ByteLevel" in pre_tokenizer:
        return "byte_level"
    if (
        "Metaspace" in decoder
        or "Metaspace" in pre_tokenizer
        or "▁" in decoder
        or "▁" in repr(backend.normalizer)
    ):
        return "metaspace"
    return "plain"


def _piece_bytes(piece: str, kind: str, byte_fallback: bool) -> bytes:
    if kind == "byte_level" and all(character in _BYTE_OF_CHARACTER for character in piece):
        return bytes(_BYTE_OF_CHARACTER[character] for character in piece)
    if byte_fallback and (match := _BYTE_FALLBACK_PIECE.fullmatch(piece)):
        return bytes([int(match.group(1), 16)])
    if kind == "metaspace":
        return piece.replace("▁", " ").encode("utf-8")
    return piece.encode("utf-8")


def _build_token_table(tokenizer) -> TokenTable:
    backend = _backend(tokenizer)
    kind = _tokenizer_kind(backend)
    byte_fallback = bool(getattr(backend.model, "byte_fallback", False)) or "ByteFallback" in repr(
        backend.decoder
    )
    added = tokenizer.added_tokens_decoder  # id -> AddedToken: their content is literal text
    special_ids = {index for index, token in added.items() if token.special} | set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))

    token_bytes, raw_strings, fallback_ids = [], [], set()
    for index, piece in enumerate(pieces):
        if piece is None or index in special_ids:
            token_bytes.append(None)
            raw_strings.append(None)
            continue
        if index in added:
            token_bytes.append(added[index].content.encode("utf-8"))
            raw_strings.append(added[index].content)
            continue
        token_bytes.append(_piece_bytes(piece, kind, byte_fallback))
        raw_strings.append(piece.replace("Ġ", "▁") if kind == "byte_level" else piece)
        if byte_fallback and _BYTE_FALLBACK_PIECE.fullmatch(piece):
            fallback_ids.add(index)

    digest = hashlib.sha256(kind.encode())
    digest.update(
        "\x00".join(piece if piece is not None else "\x01" for piece in pieces).encode("utf-8", "replace")
    )
    digest.update(repr((sorted(special_ids), tokenizer.eos_token_id)).encode())
    lengths = np.array([-1 if value is None else len(value) for value in token_bytes], dtype=np.int64)
    codes = np.array(
        [
            -1 if value is None else _CODE_OF_BYTES.setdefault(value, len(_CODE_OF_BYTES))
            for value in token_bytes
        ],
        dtype=np.int64,
    )
    return TokenTable(
        fingerprint=digest.hexdigest(),
        kind=kind,
        token_bytes=tuple(token_bytes),
        byte_lengths=lengths,
        raw_strings=tuple(raw_strings),
        byte_codes=codes,
        fallback_ids=frozenset(fallback_ids),
        eos_token_id=tokenizer.eos_token_id,
    )


def token_table(tokenizer) -> TokenTable:
    """The :class:`TokenTable` of ``tokenizer``, computed once per tokenizer object (and per vocabulary size,
    so adding tokens invalidates it). About a second for a 150k vocabulary."""
    _backend(tokenizer)  # a clear error for tokenizers without offsets
    cached = _TABLES_BY_TOKENIZER.get(tokenizer)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    table = _build_token_table(tokenizer)
    table = _TABLES_BY_FINGERPRINT.setdefault(table.fingerprint, table)
    _TABLES_BY_TOKENIZER[tokenizer] = (len(tokenizer), table)
    return table


# ---------------------------------------------------------------------------------------------------------
# Shared vocabulary of a tokenizer pair (cached per pair of fingerprints)
# ---------------------------------------------------------------------------------------------------------


def _preferred_ids(table: TokenTable, mode: str) -> dict:
    """Key -> id, one id per key. Keys are raw strings or token bytes. When several ids spell the same bytes
    (``A`` and ``<0x41>``), the one the tokenizer emits is kept: regular pieces before byte fallback, then the
    lowest id."""
    keys = table.raw_strings if mode == "raw" else table.token_bytes
    preferred: dict = {}
    for index, key in enumerate(keys):
        if key is None:
            continue
        rank = (index in table.fallback_ids, index)
        if key not in preferred or rank < preferred[key][0]:
            preferred[key] = (rank, index)
    return {key: index for key, (_, index) in preferred.items()}


@functools.lru_cache(maxsize=64)
def _shared_pairs(student_fingerprint: str, teacher_fingerprint: str, mode: str, include_eos: bool) -> tuple:
    student, teacher = (
        _TABLES_BY_FINGERPRINT[student_fingerprint],
        _TABLES_BY_FINGERPRINT[teacher_fingerprint],
    )
    student_keys, teacher_keys = _preferred_ids(student, mode), _preferred_ids(teacher, mode)
    pairs = sorted((index, teacher_keys[key]) for key, index in student_keys.items() if key in teacher_keys)
    if include_eos and student.eos_token_id is not None and teacher.eos_token_id is not None:
        pairs.append((student.eos_token_id, teacher.eos_token_id))
    return tuple(pairs)


def shared_vocabulary(
    student_tokenizer, teacher_tokenizer, *, mode: str = "raw", include_eos: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCT's shared vocabulary V∩ (methods.md §8.1 step 4, §8.4.5) as two aligned id lists.

    Args:
        mode: ``"raw"`` (faithful default): pieces with equal strings after mapping the byte-level space
            marker ``Ġ`` to SentencePiece's ``▁`` (``ĠHello`` = ``▁Hello``); byte-level pieces are otherwise
            kept as written, so ``Ã©`` (byte-level é) does not match ``é``. ``"decoded"``: pieces that spell
            the same UTF-8 bytes once space markers and the byte-level alphabet are decoded to real text
            (also matches ``Ċ`` with ``<0x0A>``, ``Ã©`` with ``é``). Special tokens never match.
        include_eos: append the forced (student EOS, teacher EOS) pair, as the reference does. Skipped when
            either tokenizer has no EOS token.

    Returns:
        ``(student_ids, teacher_ids)``: ``int64 [K]`` tensors, sorted by student id (the EOS pair last);
        ``student_ids[k]`` and ``teacher_ids[k]`` are the same token. Cached per pair of vocabularies.
    """
    if mode not in SHARED_VOCAB_MODES:
        raise ValueError(f"mode={mode!r}; choose one of {SHARED_VOCAB_MODES}.")
    student, teacher = token_table(student_tokenizer), token_table(teacher_tokenizer)
    pairs = _shared_pairs(student.fingerprint, teacher.fingerprint, mode, include_eos)
    ids = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return ids[:, 0].clone(), ids[:, 1].clone()


# ---------------------------------------------------------------------------------------------------------
# Byte offsets
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedText:
    """``ids``: ``int64 [n]`` token ids (no special tokens); ``offsets``: ``int64 [n, 2]`` UTF-8 byte
    ``(start, end)`` of each token in the text. Tokens do not overlap, except tokens of one character that
    cannot be re-split by their bytes, which share the character's span; a token that spells nothing of the
    text (a prefix ``▁``) is empty."""

    ids: np.ndarray
    offsets: np.ndarray


def _char_to_byte(text: str) -> np.ndarray:
    """``int64 [len(text) + 1]``: the UTF-8 byte position of every character position."""
    code_points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    widths = 1 + (code_points >= 0x80).astype(np.int64) + (code_points >= 0x800) + (code_points >= 0x10000)
    table = np.zeros(len(code_points) + 1, dtype=np.int64)
    np.cumsum(widths, out=table[1:])
    return table


def _split_shared_characters(offsets: np.ndarray, byte_lengths: np.ndarray) -> np.ndarray:
    """Re-split tokens whose byte spans overlap (several tokens of one multi-byte character: a byte-level
    BPE gives each the whole character's span, byte fallback ``<0xE2><0x82><0xAC>`` likewise).

    A cluster of overlapping tokens is re-split by the tokens' own byte lengths when they add up to the
    cluster's span (then each token gets its exact bytes); otherwise (unknown lengths, a normaliser that
    changed the bytes) every token of the cluster gets the whole span, so no boundary falls inside it.
    Empty tokens are left out of the clusters and placed at the end of what precedes them.
    """
    offsets = offsets.copy()
    nonempty = np.flatnonzero(offsets[:, 1] > offsets[:, 0])
    if len(nonempty) > 1:
        starts, ends, lengths = offsets[nonempty, 0], offsets[nonempty, 1], byte_lengths[nonempty]
        reached = np.maximum.accumulate(ends)
        opens_cluster = np.ones(len(nonempty), dtype=bool)
        opens_cluster[1:] = starts[1:] >= reached[:-1]
        if not opens_cluster.all():
            firsts = np.flatnonzero(opens_cluster)
            cluster = np.cumsum(opens_cluster) - 1
            span_start = np.minimum.reduceat(starts, firsts)
            span_end = np.maximum.reduceat(ends, firsts)
            fits = (np.minimum.reduceat(lengths, firsts) >= 0) & (
                np.add.reduceat(lengths, firsts) == span_end - span_start
            )
            cumulative = np.cumsum(lengths)
            before_cluster = (cumulative - lengths)[firsts]
            split_end = span_start[cluster] + cumulative - before_cluster[cluster]
            split_start = split_end - lengths
            fits_token = fits[cluster]
            offsets[nonempty, 0] = np.where(fits_token, split_start, span_start[cluster])
            offsets[nonempty, 1] = np.where(fits_token, split_end, span_end[cluster])
    empty = offsets[:, 1] <= offsets[:, 0]
    if empty.any():
        reached = np.maximum.accumulate(np.where(empty, 0, offsets[:, 1]))
        offsets[empty, 0] = offsets[empty, 1] = reached[empty]
    return offsets


def _byte_offsets(text: str, ids: np.ndarray, char_offsets, table: TokenTable) -> np.ndarray:
    offsets = _char_to_byte(text)[np.asarray(char_offsets, dtype=np.int64).reshape(-1, 2)]
    lengths = table.byte_lengths[ids]  # a copy (fancy indexing)
    if len(ids) and lengths[0] > 0 and table.token_bytes[ids[0]][:1] == b" " and not text.startswith(" "):
        # A prefix space the tokenizer added (SentencePiece "▁Hello" for "Hello") is not in the text.
        lengths[0] -= 1
        if lengths[0] == 0:  # a lone "▁" spells nothing of the text
            offsets[0, 1] = offsets[0, 0]
    return _split_shared_characters(offsets, lengths)


def encode_with_offsets(texts: Sequence[str], tokenizer) -> list[EncodedText]:
    """Tokenise ``texts`` in one batched call (no special tokens) with UTF-8 byte offsets per token.

    Character offsets from the fast tokenizer are mapped to bytes; tokens that share a character are
    re-split at their bytes (see :func:`align_offsets`). Linear in the text length.
    """
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings; wrap a single text as [text].")
    table = token_table(tokenizer)
    encoding = tokenizer(
        list(texts), add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False
    )
    encoded = []
    for text, ids, char_offsets in zip(texts, encoding["input_ids"], encoding["offset_mapping"]):
        ids = np.asarray(ids, dtype=np.int64)
        encoded.append(EncodedText(ids=ids, offsets=_byte_offsets(text, ids, char_offsets, table)))
    return encoded


def byte_offsets_from_ids(ids: Sequence[int], tokenizer, text: str | None = None) -> np.ndarray:
    """``int64 [n, 2]`` byte offsets of given ids (e.g. sampled completion ids) in their decoded text, from
    each token's byte length (no re-tokenisation, so non-canonical samples keep their own ids).

    ``text`` is ``tokenizer.decode(ids, clean_up_tokenization_spaces=False)`` (computed when not given). A
    leading space the decoder strips (SentencePiece) is accounted for; special tokens get empty spans.

    Raises:
        ValueError: if the byte lengths do not add up to the decoded text (e.g. a sample that ends inside a
            multi-byte character decodes to U+FFFD); re-encode the text with :func:`encode_with_offsets`.
    """
    table = token_table(tokenizer)
    ids = np.asarray(ids, dtype=np.int64)
    if text is None:
        text = tokenizer.decode(ids.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    lengths = np.maximum(table.byte_lengths[ids], 0)
    text_length = len(text.encode("utf-8"))
    if len(ids) and lengths.sum() == text_length + 1 and table.token_bytes[ids[0]][:1] == b" ":
        lengths[0] -= 1  # the decoder stripped the prefix space
    if lengths.sum() != text_length:
        raise ValueError(
            f"The tokens' bytes ({int(lengths.sum())}) do not add up to the decoded text "
            f"({text_length} bytes); "
            "the ids probably end inside a multi-byte character or the decoder rewrites text. Decode the ids "
            "once and re-encode the text with encode_with_offsets()."
        )
    ends = np.cumsum(lengths)
    return np.stack([ends - lengths, ends], axis=1)


# ---------------------------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------------------------


def _check_offsets(offsets, side: str) -> np.ndarray:
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.size == 0:
        return offsets.reshape(0, 2)
    if offsets.ndim != 2 or offsets.shape[1] != 2:
        raise ValueError(f"{side} offsets must have shape [n, 2] (start, end), got {offsets.shape}.")
    if (offsets < 0).any() or (offsets[:, 1] < offsets[:, 0]).any():
        raise ValueError(f"{side} offsets must satisfy 0 <= start <= end for every token.")
    return offsets


_NOTHING_FOLLOWS = np.iinfo(np.int64).max


def _cuts(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where this tokenisation may close a segment: ``(low, high, count)`` per cut, ``low`` unique.

    After token i the text reaches ``low = max(end[:i+1])``; the next non-empty token starts at ``high``.
    ``high < low`` (overlapping tokens, one character split across them) is no cut. ``high > low`` is a gap of
    text that no token claims; its owner is unknown (an NFC normaliser maps a token that ends in a composed
    "é" to end before the U+0301 it absorbed; ``trim_offsets`` starts a token after its own space), so the cut
    is the interval [low, high] and only matches the very same interval on the other side. After the last
    token, ``high = low``. Tokens ending at the same place (empty tokens) stay with what precedes them: the
    last count per ``low`` is kept. Position 0 is never a cut.
    """
    starts, ends = offsets[:, 0], offsets[:, 1]
    reach = np.maximum.accumulate(ends)
    nonempty_starts = np.where(ends > starts, starts, _NOTHING_FOLLOWS)
    next_start = np.empty_like(nonempty_starts)
    next_start[-1] = _NOTHING_FOLLOWS
    next_start[:-1] = np.minimum.accumulate(nonempty_starts[::-1])[::-1][1:]
    next_start = np.where(next_start == _NOTHING_FOLLOWS, reach, next_start)
    closes = (next_start >= reach) & (reach > 0)
    low, high, count = reach[closes], next_start[closes], np.flatnonzero(closes) + 1
    last_at_low = np.ones(len(low), dtype=bool)
    last_at_low[:-1] = low[:-1] != low[1:]
    return low[last_at_low], high[last_at_low], count[last_at_low]


def _matched(low, high, other_low, other_high, size) -> np.ndarray:
    """Which of these cuts the other side has too (same low and high); O(n + size) with an array mark."""
    other_high_at = np.full(size, -1, dtype=np.int64)
    other_high_at[other_low] = other_high
    return other_high_at[low] == high


def align_offsets(student_offsets, teacher_offsets) -> np.ndarray:
    """The finest common segmentation of two tokenisations of the same text, from their offsets.

    Args:
        student_offsets, teacher_offsets: ``[n_s, 2]`` and ``[n_t, 2]`` (start, end) per token in the same
            units on both sides (UTF-8 bytes from :func:`encode_with_offsets`, or characters). Tokens must be
            in text order; overlapping spans are kept in one segment.

    Returns:
        ``int64 [G, 4]`` rows ``(s0, s1, t0, t1)``: ordered and contiguous (row g starts where row g-1 ends),
        covering ``0:n_s`` and ``0:n_t``. A segment closes where both sides have a token boundary at the same
        position (a two-pointer merge of the boundary positions, done with O(n + text length) array marks);
        tokens whose spans overlap stay together, and a gap of unclaimed text is a boundary only where the
        other side has the identical gap.
        Tokens after the last common boundary join the last segment. Empty when both sides are empty; one
        segment ``(0, n_s, 0, n_t)`` when there is no common boundary.
    """
    student_offsets = _check_offsets(student_offsets, "student")
    teacher_offsets = _check_offsets(teacher_offsets, "teacher")
    n_student, n_teacher = len(student_offsets), len(teacher_offsets)
    if n_student == 0 or n_teacher == 0:
        return np.array([[0, n_student, 0, n_teacher]] if n_student + n_teacher else [], np.int64).reshape(
            -1, 4
        )
    student_low, student_high, student_counts = _cuts(student_offsets)
    teacher_low, teacher_high, teacher_counts = _cuts(teacher_offsets)
    size = int(max(student_low.max(initial=0), teacher_low.max(initial=0))) + 1
    student_ends = student_counts[_matched(student_low, student_high, teacher_low, teacher_high, size)]
    teacher_ends = teacher_counts[_matched(teacher_low, teacher_high, student_low, student_high, size)]
    if len(student_ends) == 0:
        student_ends, teacher_ends = np.array([n_student]), np.array([n_teacher])
    student_ends[-1], teacher_ends[-1] = n_student, n_teacher
    segments = np.empty((len(student_ends), 4), dtype=np.int64)
    segments[:, 1], segments[:, 3] = student_ends, teacher_ends
    segments[0, 0] = segments[0, 2] = 0
    segments[1:, 0], segments[1:, 2] = student_ends[:-1], teacher_ends[:-1]
    return segments


def align_tokens(
    text: str, student_tokenizer, teacher_tokenizer
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Ordered, contiguous segments ``((s0, s1), (t0, t1))`` covering both tokenisations of ``text`` (each
    tokenizer's ids without special tokens) such that student tokens ``s0:s1`` and teacher tokens ``t0:t1``
    spell the same piece of text. The finest such segmentation (see :func:`align_offsets`)."""
    student, teacher = (
        encode_with_offsets([text], tokenizer)[0] for tokenizer in (student_tokenizer, teacher_tokenizer)
    )
    return [
        ((s0, s1), (t0, t1)) for s0, s1, t0, t1 in align_offsets(student.offsets, teacher.offsets).tolist()
    ]


@dataclass(frozen=True)
class Alignment:
    """One text tokenised by both sides. ``segments``: ``int64 [G, 4]`` finest segments (s0, s1, t0, t1);
    ``anchors``: ``bool [G]``, 1:1 segments whose two tokens spell the same bytes (SimCT's anchors)."""

    student_ids: np.ndarray
    teacher_ids: np.ndarray
    segments: np.ndarray
    anchors: np.ndarray


def _eos_id(tokenizer, side: str) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"The {side} tokenizer has no eos_token; set tokenizer.eos_token or pass append_eos=False."
        )
    return int(tokenizer.eos_token_id)


def align_texts(
    texts: Sequence[str], student_tokenizer, teacher_tokenizer, *, append_eos: bool = False
) -> list[Alignment]:
    """Tokenise each text with both tokenizers (batched) and align them (:func:`align_offsets`).

    ``append_eos=True`` appends each tokenizer's EOS id and a final 1:1 segment pairing them, which is an
    anchor (SimCT's forced EOS pair), so the completion's last segment is supervised.
    """
    student_codes, teacher_codes = (
        token_table(student_tokenizer).byte_codes,
        token_table(teacher_tokenizer).byte_codes,
    )
    students = encode_with_offsets(texts, student_tokenizer)
    teachers = encode_with_offsets(texts, teacher_tokenizer)
    alignments = []
    for student, teacher in zip(students, teachers):
        segments = align_offsets(student.offsets, teacher.offsets)
        student_ids, teacher_ids = student.ids, teacher.ids
        if append_eos:
            n_s, n_t = len(student_ids), len(teacher_ids)
            student_ids = np.append(student_ids, _eos_id(student_tokenizer, "student"))
            teacher_ids = np.append(teacher_ids, _eos_id(teacher_tokenizer, "teacher"))
            segments = np.concatenate([segments, np.array([[n_s, n_s + 1, n_t, n_t + 1]])])
        one_to_one = (segments[:, 1] - segments[:, 0] == 1) & (segments[:, 3] - segments[:, 2] == 1)
        anchors = one_to_one.copy()
        if one_to_one.any():
            student_code = student_codes[student_ids[segments[one_to_one, 0]]]
            teacher_code = teacher_codes[teacher_ids[segments[one_to_one, 2]]]
            anchors[one_to_one] = (student_code == teacher_code) & (student_code >= 0)
        if append_eos:
            anchors[-1] = True
        alignments.append(Alignment(student_ids, teacher_ids, segments, anchors))
    return alignments


def simct_segments(segments: np.ndarray, anchors: np.ndarray, *, spans: bool = True) -> np.ndarray:
    """Fold finest segments into SimCT's segments (methods.md §8.1 step 5, §8.4.4).

    Each SimCT segment is a maximal run of non-anchor segments plus the anchor that closes it; an anchor
    alone is a shared-token row. Segments after the last anchor are dropped (as in the reference).

    Args:
        segments: ``int64 [G, 4]`` from :func:`align_offsets` / :class:`Alignment`.
        anchors: ``bool [G]``.
        spans: ``False`` keeps only the 1:1 anchors (the ``simple`` / ``span_ctkd_1to1`` ablations).

    Returns:
        ``int64 [H, 4]`` rows (s0, s1, t0, t1), contiguous from 0 up to the last anchor.
    """
    segments, anchors = np.asarray(segments, dtype=np.int64), np.asarray(anchors, dtype=bool)
    if segments.ndim != 2 or segments.shape[1] != 4 or anchors.shape != (len(segments),):
        raise ValueError(
            f"segments must be [G, 4] and anchors [G], got {segments.shape} and {anchors.shape}."
        )
    closing = segments[anchors]
    if not spans:
        return closing
    folded = closing.copy()
    folded[1:, 0], folded[1:, 2] = closing[:-1, 1], closing[:-1, 3]
    if len(folded):
        folded[0, 0], folded[0, 2] = segments[0, 0], segments[0, 2]
    return folded


def stack_segments(per_example: Sequence[np.ndarray]) -> torch.Tensor:
    """Stack per-example ``[G_b, 4]`` segments into the ``int64 [G, 5]`` rows (b, s0, s1, t0, t1) that
    :func:`simct_loss` and :func:`uld_loss` take."""
    rows = [
        np.concatenate(
            [np.full((len(segments), 1), example), np.asarray(segments, np.int64).reshape(-1, 4)], 1
        )
        for example, segments in enumerate(per_example)
    ]
    return torch.from_numpy(np.concatenate(rows) if rows else np.zeros((0, 5), np.int64))


def alignment_stats(segments: np.ndarray, anchors: np.ndarray | None = None) -> dict[str, float]:
    """Shares of student tokens, for logging: ``one_to_one`` (in a 1:1 segment: the token's own
    distribution is compared with a teacher distribution over the same text), and with ``anchors``
    ``anchor`` (1:1 with equal strings) and ``align_ratio`` (SimCT's: inside a SimCT segment, not dropped)."""
    segments = np.asarray(segments, dtype=np.int64).reshape(-1, 4)
    student_lengths = segments[:, 1] - segments[:, 0]
    total = max(int(student_lengths.sum()), 1)
    one_to_one = (student_lengths == 1) & (segments[:, 3] - segments[:, 2] == 1)
    stats = {"one_to_one": int(one_to_one.sum()) / total}
    if anchors is not None:
        kept = simct_segments(segments, anchors)
        stats["anchor"] = int(np.asarray(anchors, bool).sum()) / total
        stats["align_ratio"] = int((kept[:, 1] - kept[:, 0]).sum()) / total
    return stats


# ---------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (exact tests); bf16 / fp16 / fp32 are computed in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _check_segment_inputs(student_logits, teacher_logits, student_ids, teacher_ids, segments, temperature):
    if student_logits.dim() != 3 or teacher_logits.dim() != 3:
        raise ValueError(
            "student_logits and teacher_logits must be [B, T, V] (position k predicts completion token k); "
            f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}."
        )
    if student_ids.shape != student_logits.shape[:2] or teacher_ids.shape != teacher_logits.shape[:2]:
        raise ValueError(
            f"ids must be [B, T] like their logits: student {tuple(student_ids.shape)} vs "
            f"{tuple(student_logits.shape[:2])}, teacher {tuple(teacher_ids.shape)} vs "
            f"{tuple(teacher_logits.shape[:2])}."
        )
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"Batch sizes differ: {student_logits.shape[0]} vs {teacher_logits.shape[0]}.")
    if segments.dim() != 2 or segments.shape[1] != 5 or segments.dtype != torch.long:
        raise ValueError(
            "segments must be an int64 [G, 5] tensor (b, s0, s1, t0, t1) (see stack_segments), got "
            f"{segments.dtype} {tuple(segments.shape)}."
        )
    if len(segments) == 0:
        raise ValueError(
            "segments is empty: there is nothing to align (no anchors?); skip the loss for this batch."
        )
    batch, s0, s1, t0, t1 = segments.unbind(-1)
    if (batch < 0).any() or (batch >= student_logits.shape[0]).any():
        raise ValueError("segments[:, 0] (the batch index) is out of range.")
    if (s0 < 0).any() or (s1 <= s0).any() or (s1 > student_logits.shape[1]).any():
        raise ValueError(
            "Every segment needs 0 <= s0 < s1 <= T_S (at least one student token); drop empty ones."
        )
    if (t0 < 0).any() or (t1 <= t0).any() or (t1 > teacher_logits.shape[1]).any():
        raise ValueError(
            "Every segment needs 0 <= t0 < t1 <= T_T (at least one teacher token); drop empty ones."
        )
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 (it divides the logits).")


def _segment_positions(batch, start, end) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten the positions start..end-1 of every segment: (segment index, batch index, position), [N]."""
    lengths = end - start
    segment = torch.repeat_interleave(torch.arange(len(start), device=start.device), lengths)
    first_of_segment = torch.cumsum(lengths, 0) - lengths
    position = start[segment] + torch.arange(len(segment), device=start.device) - first_of_segment[segment]
    return segment, batch[segment], position


def _token_log_probs(logits, batch, position, ids, temperature):
    """log softmax(logits[b, k] / τ)[ids[b, k]] at the given positions, [N], in float32 / float64."""
    rows = logits[batch, position].to(_compute_dtype(logits)) / temperature
    realised = rows.gather(-1, ids[batch, position].unsqueeze(-1)).squeeze(-1)
    return realised - torch.logsumexp(rows, dim=-1)


def _reduce(per_segment, segments, reduction, num_items):
    if reduction == "none":
        return per_segment
    total = per_segment.sum()
    if reduction == "sum":
        return total
    if num_items is None:
        num_items = int((segments[:, 2] - segments[:, 1]).sum())
    return total / num_items


def _check_reduction(reduction):
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; choose one of {LOSS_REDUCTIONS}.")


def _simct_rows(logits, ids, batch, start, end, columns, is_span, temperature, span_score):
    """[G, K + 1] rows: logits at each segment's first position over the shared columns, then the span
    column (mean realised score over the segment's positions; absent for non-span rows)."""
    dtype = _compute_dtype(logits)
    first = logits[batch.unsqueeze(1), start.unsqueeze(1), columns.unsqueeze(0)].to(dtype) / temperature
    segment, token_batch, position = _segment_positions(batch, start, end)
    if span_score == "logprob_mean":
        first = first - torch.logsumexp(logits[batch, start].to(dtype) / temperature, dim=-1, keepdim=True)
        token_scores = _token_log_probs(logits, token_batch, position, ids, temperature)
    else:
        realised = logits[token_batch, position, ids[token_batch, position]]
        token_scores = realised.to(dtype) / temperature
    span_sum = torch.zeros(len(start), dtype=dtype, device=logits.device).index_add(0, segment, token_scores)
    span = span_sum / (end - start).to(dtype)
    span = torch.where(is_span, span, torch.full_like(span, _ABSENT_COLUMN))
    return torch.cat([first, span.unsqueeze(1)], dim=1)


def simct_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_ids: torch.Tensor,
    teacher_ids: torch.Tensor,
    segments: torch.Tensor,
    shared_ids: tuple[torch.Tensor, torch.Tensor],
    *,
    temperature: float = 1.0,
    span_score: str = "logit_mean",
    reduction: str = "none",
    num_items: int | None = None,
    exclusive_spans: bool = False,
) -> torch.Tensor:
    """SimCT's loss (methods.md §8.2): reverse KL between one row per segment on each side.

    For segment g with first positions f_S, f_T and tokens y^S_1..y^S_mS, y^T_1..y^T_mT::

        z̃_S(g) = [ z_S,f_S[V∩_S] ; ℓ_S(g) ],   ℓ_S(g) = (1/m_S) Σ_k z_S,pos_k[y^S_k]   (only if g is a span)
        loss_g = KL( softmax(z̃_S(g)/τ) ‖ softmax(z̃_T(g)/τ) )     (teacher side detached)

    A segment is a span when either side has more than one token; otherwise the span column is absent. The
    teacher row is built under ``no_grad``; gradient reaches the student's first position through the V∩
    columns and every student position of a span through ℓ_S(g). Faithful to the reference: a span's first
    token can be in V∩ too (its mass counted twice, §8.4.2), and the closing anchor has no row of its own.

    Args:
        student_logits: ``[B, T_S, V_S]``, position k predicts ``student_ids[:, k]`` (completion positions).
        teacher_logits: ``[B, T_T, V_T]``, likewise for the teacher's tokenisation.
        student_ids, teacher_ids: ``int64 [B, T_S]``, ``[B, T_T]``; padding is never read.
        segments: ``int64 [G, 5]`` rows (b, s0, s1, t0, t1) (:func:`simct_segments` + :func:`stack_segments`).
        shared_ids: ``(student [K], teacher [K])`` from :func:`shared_vocabulary`.
        temperature: τ, divides every column of both rows (the reference's ``kd_temperature``, default 1).
        span_score: ``"logit_mean"`` (faithful: mean raw logit of the realised tokens, V∩ columns raw logits)
            or ``"logprob_mean"`` (§8.4.1: V∩ columns are log-softmax values at τ, the span column the mean
            log-softmax value of the realised tokens; the rows are then renormalised by the softmax).
        reduction: ``"none"`` → ``[G]`` per segment (for per-segment weights); ``"sum"``; ``"token_mean"`` →
            sum / ``num_items`` (the reference's N = student loss tokens; default Σ (s1 - s0)).
        exclusive_spans: our fix of the double counting (§8.4.2), off by default (faithful). In a span row, the
            V∩ columns of the span's first student token and of its first teacher token are removed from both
            rows, so the span's continuation is counted once, by the span column. Without it, a span whose first
            student token is shared (a character-level student writing ``boxed`` as ``b`` ``o`` ...) pushes that
            token down at the span's first position: the teacher, which writes ``boxed`` as one token, gives the
            lone ``b`` almost no probability.

    Returns:
        ``[G]`` or a scalar, float32 (float64 for float64 logits).
    """
    if span_score not in SPAN_SCORES:
        raise ValueError(f"span_score={span_score!r}; choose one of {SPAN_SCORES}.")
    _check_reduction(reduction)
    _check_segment_inputs(student_logits, teacher_logits, student_ids, teacher_ids, segments, temperature)
    student_columns, teacher_columns = (ids.to(student_logits.device, torch.long) for ids in shared_ids)
    if (
        student_columns.shape != teacher_columns.shape
        or student_columns.dim() != 1
        or len(student_columns) == 0
    ):
        raise ValueError(
            "shared_ids must be two non-empty int64 [K] tensors of equal length (see shared_vocabulary)."
        )
    if student_columns.max() >= student_logits.shape[-1] or teacher_columns.max() >= teacher_logits.shape[-1]:
        raise ValueError("shared_ids index past the logits' vocabulary; were the two tokenizers swapped?")
    batch, s0, s1, t0, t1 = segments.to(student_logits.device).unbind(-1)
    is_span = (s1 - s0 > 1) | (t1 - t0 > 1)
    student_rows = _simct_rows(
        student_logits, student_ids, batch, s0, s1, student_columns, is_span, temperature, span_score
    )
    with torch.no_grad():
        teacher_rows = _simct_rows(
            teacher_logits.detach(),
            teacher_ids,
            batch,
            t0,
            t1,
            teacher_columns,
            is_span,
            temperature,
            span_score,
        )
    if exclusive_spans:
        excluded = _first_token_columns(student_ids, teacher_ids, batch, s0, t0, student_columns, teacher_columns,
                                        student_logits.shape[-1], teacher_logits.shape[-1]) & is_span.unsqueeze(1)
        student_rows = student_rows.masked_fill(excluded, _ABSENT_COLUMN)
        teacher_rows = teacher_rows.masked_fill(excluded, _ABSENT_COLUMN)
    student_log_probs = torch.log_softmax(student_rows, dim=-1)
    teacher_log_probs = torch.log_softmax(teacher_rows.to(student_log_probs.dtype), dim=-1)
    # 0·log 0 = 0 where a shared entry is masked (−inf) on both sides, in value and gradient.
    per_segment = _weighted_log_ratio(student_log_probs, teacher_log_probs).sum(-1)
    return _reduce(per_segment, segments, reduction, num_items)


def _first_token_columns(student_ids, teacher_ids, batch, s0, t0, student_columns, teacher_columns, vocab_s,
                         vocab_t) -> torch.Tensor:
    """bool ``[G, K + 1]``: the V∩ columns of each segment's first student and first teacher token (the span
    column, last, is never set)."""
    device = student_columns.device
    columns = len(student_columns)
    student_index = torch.full((vocab_s,), -1, dtype=torch.long, device=device)
    student_index[student_columns] = torch.arange(columns, device=device)
    teacher_index = torch.full((vocab_t,), -1, dtype=torch.long, device=device)
    teacher_index[teacher_columns] = torch.arange(columns, device=device)
    mask = torch.zeros((len(batch), columns + 2), dtype=torch.bool, device=device)
    rows = torch.arange(len(batch), device=device)
    for column in (student_index[student_ids[batch, s0]], teacher_index[teacher_ids[batch, t0]]):
        mask[rows, torch.where(column >= 0, column, columns + 1)] = True  # absent: a scratch column, dropped below
    return mask[:, : columns + 1]


def _merged_sorted_probs(logits, ids, batch, start, end, temperature, merge):
    """GOLD's merged distribution per segment, sorted descending, [G, V].

    ``observed``: distribution at the first position × probabilities of the later realised tokens;
    ``bayesian``: distribution at the last position × probabilities of the earlier realised tokens. The
    scale is a scalar per row, so sorting the base distribution and scaling gives the sorted merge.
    """
    dtype = _compute_dtype(logits)
    base_position = start if merge == "observed" else end - 1
    base = torch.softmax(logits[batch, base_position].to(dtype) / temperature, dim=-1)
    segment, token_batch, position = _segment_positions(batch, start, end)
    scaled = position != base_position[segment]
    log_scale = torch.zeros(len(start), dtype=dtype, device=logits.device)
    if scaled.any():
        log_probs = _token_log_probs(logits, token_batch[scaled], position[scaled], ids, temperature)
        log_scale = log_scale.index_add(0, segment[scaled], log_probs)
    return base.sort(dim=-1, descending=True).values * log_scale.exp().unsqueeze(1)


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_ids: torch.Tensor,
    teacher_ids: torch.Tensor,
    segments: torch.Tensor,
    *,
    temperature: float = 1.0,
    merge: str = "observed",
    reduction: str = "none",
    num_items: int | None = None,
) -> torch.Tensor:
    """Universal Logit Distillation on aligned segments, as TRL GOLD computes it (methods.md §8.5)::

        loss_g = Σ_i | sort↓(P_S(g))_i − sort↓(P_T(g))_i |      (the shorter side zero-padded)

    where P(g) is the merged distribution of segment g (see ``merge``) at temperature τ. It ignores token
    identity (permutation invariant): a baseline, not a divergence between matched tokens.

    Differences from ``trl.experimental.gold.ULDLoss``: one temperature for both sides (trl_opd's rule),
    logits where position k predicts token k (GOLD's ``observed`` reads its logits one position late; its
    ``bayesian`` matches this convention), token probabilities multiplied exactly in log space (GOLD clamps
    each at 1e-8), and no EOS dropping or cross-entropy term (pass the segments you want supervised). GOLD's
    per-example value is ``loss.mean()`` over that example's segments.

    Args:
        student_logits, teacher_logits, student_ids, teacher_ids, segments: as in :func:`simct_loss`.
        merge: ``"observed"`` (first position × later tokens) or ``"bayesian"`` (last position × earlier).
        reduction, num_items: as in :func:`simct_loss`.

    Returns:
        ``[G]`` or a scalar.
    """
    if merge not in ULD_MERGES:
        raise ValueError(f"merge={merge!r}; choose one of {ULD_MERGES}.")
    _check_reduction(reduction)
    _check_segment_inputs(student_logits, teacher_logits, student_ids, teacher_ids, segments, temperature)
    batch, s0, s1, t0, t1 = segments.to(student_logits.device).unbind(-1)
    student_sorted = _merged_sorted_probs(student_logits, student_ids, batch, s0, s1, temperature, merge)
    with torch.no_grad():
        teacher_sorted = _merged_sorted_probs(
            teacher_logits.detach(), teacher_ids, batch, t0, t1, temperature, merge
        )
    teacher_sorted = teacher_sorted.to(student_sorted.dtype)
    width = min(student_sorted.shape[-1], teacher_sorted.shape[-1])
    per_segment = (student_sorted[:, :width] - teacher_sorted[:, :width]).abs().sum(-1)
    per_segment = per_segment + student_sorted[:, width:].sum(-1) + teacher_sorted[:, width:].sum(-1)
    return _reduce(per_segment, segments, reduction, num_items)


# ---------------------------------------------------------------------------------------------------------
# Per-segment weighting: OPDTrainer's token weighting and reductions, one segment = one loss row
# ---------------------------------------------------------------------------------------------------------

SEGMENT_REDUCTIONS = REDUCTIONS  # the same four, from `reduction`


def segment_grid(segments: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each segment sits in a ``[B, G_max]`` grid (its row, then its rank among the row's segments).

    Args:
        segments: ``int64 [G, 5]`` rows (b, s0, s1, t0, t1), grouped by b (as :func:`stack_segments` gives them).
        batch_size: B.

    Returns:
        ``(rank [G], valid [B, G_max])``: ``grid[b, rank[g]]`` is segment g's cell; ``valid`` marks the cells that
        hold a segment.
    """
    rows = segments[:, 0]
    counts = torch.bincount(rows, minlength=batch_size)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(rows), device=rows.device) - first[rows]
    width = int(counts.max()) if len(rows) else 0
    valid = torch.zeros((batch_size, max(width, 1)), dtype=torch.bool, device=rows.device)
    valid[rows, rank] = True
    return rank, valid


@torch.no_grad()
def segment_position_weights(segments: torch.Tensor, student_mask: torch.Tensor, **position_kwargs) -> torch.Tensor:
    """PW-OPSD / IW-OPD position weights per segment: the mean of ``weighting.position_weights`` over the
    segment's student tokens (positions relative to the student's re-tokenised completion). A 1:1 segment gets
    exactly its token's weight, as in OPDTrainer.

    Args:
        segments: ``[G, 5]``. student_mask: ``[B, T_S]`` real student tokens.
        position_kwargs: ``w_min``, ``tau``, ``slope``, ``direction`` of ``position_weights``.

    Returns:
        float32 ``[G]``.
    """
    from .weighting import position_weights

    weights = position_weights(student_mask, **position_kwargs, dtype=torch.float64)
    cumulative = torch.nn.functional.pad(weights.cumsum(dim=1), (1, 0))
    rows, s0, s1 = segments[:, 0], segments[:, 1], segments[:, 2]
    total = cumulative[rows, s1] - cumulative[rows, s0]
    return (total / (s1 - s0).clamp(min=1)).float()


@torch.no_grad()
def segment_tip_mask(
    segments: torch.Tensor,
    student_entropy: torch.Tensor,
    divergence: torch.Tensor,
    batch_size: int,
    **tip_kwargs,
) -> torch.Tensor:
    """TIP selection over segments (``weighting.tip_mask`` with one segment in place of one token).

    Args:
        segments: ``[G, 5]``.
        student_entropy: ``[B, T_S]`` student entropy; a segment's is the entropy at its first student position
            (the distribution its loss row is read from).
        divergence: ``[G]`` the segment's own loss value (detached).
        batch_size: B.
        tip_kwargs: ``ratio``, ``strategy`` (``"soft_or"``, ``"entropy_sample"``, ``"divergence_only"``),
            ``scope``, ``generator`` of ``tip_mask``. ρ is the share of each row's (or the micro-batch's) segments
            kept, at least one.

    Returns:
        bool ``[G]``: the kept segments.
    """
    from .weighting import tip_mask

    if len(segments) == 0:
        return torch.zeros(0, dtype=torch.bool, device=segments.device)
    rank, valid = segment_grid(segments, batch_size)
    rows = segments[:, 0]
    entropy_grid = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    entropy_grid[rows, rank] = student_entropy[rows, segments[:, 1]].float()
    divergence_grid = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    divergence_grid[rows, rank] = divergence.detach().float()
    return tip_mask(entropy_grid, divergence_grid, valid, **tip_kwargs)[rows, rank]


@torch.no_grad()
def segment_loss_coefficients(
    segments: torch.Tensor,
    row_tokens: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    reduction: str = "token_mean",
    num_items=None,
    num_sequences=None,
) -> torch.Tensor:
    """Detached ``[G]`` coefficients c such that the micro-batch loss is Σ_g c_g · ℓ_g (``losses.token_loss_coefficients``
    with segments in place of tokens).

    A segment's loss row stands for its n_g = s1 − s0 student tokens, and SimCT divides by student tokens, not by
    segments. With w the segment weights (default 1) and L_b = ``row_tokens[b]`` (student tokens of row b):

    * ``"token_mean"``: w_g / num_items (default Σ_b L_b); the trainer passes the step's generated tokens.
    * ``"token_mean_microbatch"``: w_g / max(Σ_b L_b, 1).
    * ``"sequence_mean"``: w_g / (L_b · num_sequences), num_sequences defaulting to the rows with L_b ≥ 1.
    * ``"weighted_mean"``: w_g / Σ_g w_g·n_g, the mean over the selected student tokens (TIP Eq. 9); with
      w = 1 and every token in a segment it equals ``"token_mean_microbatch"``. Pass ``num_items`` to use a
      cross-process Σ w·n instead.
    """
    dtype = torch.float64 if weights is not None and weights.dtype == torch.float64 else torch.float32
    rows, tokens = segment_units(segments)
    return unit_coefficients(
        reduction, rows, tokens, row_tokens, weights, num_items=num_items, num_sequences=num_sequences, dtype=dtype
    )


@torch.no_grad()
def segment_teacher_coverage(
    teacher_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    segments: torch.Tensor,
    shared_teacher_ids: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Share of the teacher's next-token probability that a segment's row represents, ``[G]`` float32.

    At the segment's first teacher position: the mass on the shared vocabulary V∩, plus, for a span (more than one
    token on either side), the mass of the span's first teacher token when that token is not in V∩ (the span column
    stands for it). A row whose coverage is small compares the student with the teacher's leftovers renormalised
    over V∩: e.g. after ``\\`` a BPE teacher puts ~all its mass on ``boxed``, which a character-level student
    cannot write as one token; its V∩ row is then noise.
    """
    rows, s0, s1, t0, t1 = segments.unbind(-1)
    probs = torch.softmax(teacher_logits[rows, t0].float() / temperature, dim=-1)
    covered = probs[:, shared_teacher_ids.to(probs.device)].sum(-1)
    in_shared = torch.zeros(probs.shape[-1], dtype=torch.bool, device=probs.device)
    in_shared[shared_teacher_ids.to(probs.device)] = True
    first = teacher_ids[rows, t0]
    is_span = ((s1 - s0) > 1) | ((t1 - t0) > 1)
    extra = probs.gather(-1, first.unsqueeze(-1)).squeeze(-1) * (is_span & ~in_shared[first])
    return (covered + extra).clamp(max=1.0)
