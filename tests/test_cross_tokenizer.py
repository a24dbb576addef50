"""trl_opd.cross_tokenizer: alignment, shared vocabulary, SimCT and ULD losses (methods.md §8).

Real tokenizers (Qwen3, Llama-3, GPT-2, Pythia, Mistral) come from tests/data/tokenizers (gzip-compressed
tokenizer.json, see ATTRIBUTION.md); the character-level one is the testbed's. Every check of what tokens
spell uses an oracle written here (transformers' own GPT-2 byte table, SentencePiece rules), not the
library's token tables.
"""

from __future__ import annotations

import gzip
import itertools
import re
import shutil
import types
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from trl_opd.cross_tokenizer import (
    align_offsets,
    align_texts,
    align_tokens,
    alignment_stats,
    byte_offsets_from_ids,
    encode_with_offsets,
    shared_vocabulary,
    simct_loss,
    simct_segments,
    stack_segments,
    token_table,
    uld_loss,
)
from trl_opd.testbed.tokenizers import CHARACTERS, char_tokenizer

DATA = Path(__file__).parent / "data" / "tokenizers"
REAL = ("qwen3", "llama3", "gpt2", "pythia", "mistral")
KIND = {
    "qwen3": "byte",
    "llama3": "byte",
    "gpt2": "byte",
    "pythia": "byte",
    "mistral": "sentencepiece",
    "char": "char",
}

CORPUS = [
    # math with LaTeX
    (
        "Let $f(x) = \\frac{x^2 - 4}{x - 2}$. Then $\\lim_{x \\to 2} f(x) = 4$, so the answer is "
        "$\\boxed{4}$.\n"
        "\\[\\sum_{k=1}^{n} k^2 = \\frac{n(n+1)(2n+1)}{6}, \\quad \\int_0^1 x\\,dx = \\tfrac{1}{2}\\]"
    ),
    (
        "We have $x^2+y^2=r^2$. Substituting $y = 2x$ gives $5x^2 = r^2$, hence "
        "$x = \\pm\\frac{r}{\\sqrt{5}}$.\n\n1. $x>0$: valid.\n2. $x<0$: invalid.\n\n"
        "Therefore the answer is $\\boxed{\\frac{r\\sqrt{5}}{5}}$."
    ),
    # code with indentation (spaces and tabs)
    (
        "def fib(n):\n    if n < 2:\n        return n\n\treturn fib(n - 1) + fib(n - 2)  # tab-indented\n\n\n"
        "class A:\n    def __init__(self):\n        self.x = {'a': [1, 2, 3]}\n"
    ),
    # whitespace runs, CRLF, no-break space
    "a    b\t\t\tc\n\n\n\n   d  \r\n e \u00a0f     ",
    "\n\n  leading whitespace, trailing whitespace  \n",
    # CJK, other scripts
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "مرحبا بالعالم — नमस्ते दुनिया — Привет, мир!",
    # emoji: skin tone, ZWJ family, flag
    "Great job 👍🏽! Family: 👨\u200d👩\u200d👧\u200d👦, flag 🇫🇷, crab 🦀, faces 😀😀😀",
    # accented text, precomposed and decomposed
    "Café, naïve façade — résumé. Ångström. Decomposed: e\u0301te\u0301 and Zoe\u0308.",
    # numbers and math symbols
    "3.14159 + 2,718,281 = 12345678901234567890; -0.5e-10; 1/3 ≈ 0.333… and 100% of 2024.",
    "∀ε>0 ∃δ>0: |x−a|<δ ⇒ |f(x)−f(a)|<ε; 𝔸 ⊆ ℝ² → ∞",
    # GSM8K style, think tags (added tokens in Qwen3), repeated characters
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
    "<think>\nLet me check: 7 * 8 = 56.\n</think>\nThe product is **56**.",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!!!!!!!!!??????........~~~~",
]
ASCII_CORPUS = [text for text in CORPUS if text.isascii()]


# ---------------------------------------------------------------------------------------------------------
# Fixtures and oracles
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory):
    """The five real tokenizers (decompressed into a temporary directory) plus the testbed's char tokenizer
    over printable ASCII and every character of the corpus."""
    loaded = {}
    for name in REAL:
        directory = tmp_path_factory.mktemp(name)
        with (
            gzip.open(DATA / name / "tokenizer.json.gz", "rb") as source,
            open(directory / "tokenizer.json", "wb") as out,
        ):
            shutil.copyfileobj(source, out)
        if (DATA / name / "tokenizer_config.json").exists():
            shutil.copy(DATA / name / "tokenizer_config.json", directory)
        loaded[name] = AutoTokenizer.from_pretrained(directory)
    extra = "".join(sorted(set("".join(CORPUS)) - set(CHARACTERS)))
    loaded["char"] = char_tokenizer(CHARACTERS + extra)
    return loaded


_BYTE_OF = {character: byte for byte, character in bytes_to_unicode().items()}


def oracle_bytes(tokenizer, kind: str, ids) -> list[bytes]:
    """What each token spells, from its piece: GPT-2 byte table, SentencePiece ▁ / <0xNN>, or the text."""
    added = tokenizer.added_tokens_decoder
    spelled = []
    for index, piece in zip(ids, tokenizer.convert_ids_to_tokens(list(ids))):
        if index in added:
            spelled.append(added[index].content.encode())
        elif kind == "byte":
            spelled.append(bytes(_BYTE_OF[c] for c in piece))
        elif kind == "sentencepiece" and re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            spelled.append(bytes([int(piece[3:5], 16)]))
        else:
            spelled.append(piece.replace("▁", " ").encode())
    return spelled


def segment_strings(tokenizer, kind, ids, ranges, text) -> list[str]:
    """NFC text spelled by the tokens of each range; a SentencePiece prefix space not in the text dropped."""
    pieces = oracle_bytes(tokenizer, kind, ids)
    drop_prefix = b"".join(pieces).startswith(b" ") and not text.startswith(" ")
    strings = []
    for number, (start, end) in enumerate(ranges):
        spelled = b"".join(pieces[start:end])
        if number == 0 and drop_prefix:
            spelled = spelled[1:]
        strings.append(unicodedata.normalize("NFC", spelled.decode("utf-8", "surrogateescape")))
    return strings


def one_to_one_tokens(segments) -> int:
    segments = np.asarray(segments).reshape(-1, 4)
    return int((((segments[:, 1] - segments[:, 0]) == 1) & ((segments[:, 3] - segments[:, 2]) == 1)).sum())


PAIRS = list(itertools.combinations((*REAL, "char"), 2))


# ---------------------------------------------------------------------------------------------------------
# align_offsets on synthetic offsets
# ---------------------------------------------------------------------------------------------------------


def offsets_from_cuts(cuts):
    return np.array(list(itertools.pairwise(cuts)), dtype=np.int64)


def brute_force_segments(student_cuts, teacher_cuts):
    """Close at every common cut after 0 (clean tokenisations: token count = number of cuts passed)."""
    common = sorted(set(student_cuts[1:]) & set(teacher_cuts[1:]))
    rows, previous = [], (0, 0)
    for cut in common:
        current = (student_cuts.index(cut), teacher_cuts.index(cut))
        rows.append((previous[0], current[0], previous[1], current[1]))
        previous = current
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def test_align_offsets_matches_brute_force_on_random_tokenisations():
    rng = np.random.default_rng(0)
    for _ in range(300):
        length = int(rng.integers(1, 40))
        cuts = [
            sorted({0, length, *rng.choice(np.arange(1, length + 1), size=int(rng.integers(0, length)))})
            for _ in range(2)
        ]
        got = align_offsets(offsets_from_cuts(cuts[0]), offsets_from_cuts(cuts[1]))
        np.testing.assert_array_equal(got, brute_force_segments(cuts[0], cuts[1]))
        swapped = align_offsets(offsets_from_cuts(cuts[1]), offsets_from_cuts(cuts[0]))
        np.testing.assert_array_equal(swapped, got[:, [2, 3, 0, 1]])


def test_align_offsets_never_separates_overlapping_tokens():
    # student: "ab" | two tokens sharing character 2 (a byte-level split of one character) | "d"
    student = np.array([[0, 2], [2, 3], [2, 3], [3, 4]])
    teacher = np.array([[0, 2], [2, 3], [3, 4]])
    np.testing.assert_array_equal(align_offsets(student, teacher), [[0, 1, 0, 1], [1, 3, 1, 2], [3, 4, 2, 3]])
    # nested / partially overlapping spans on both sides: only the cut at 4 is safe on the student side
    student = np.array([[0, 3], [1, 4], [4, 6]])
    teacher = np.array([[0, 1], [1, 2], [2, 4], [4, 6]])
    np.testing.assert_array_equal(align_offsets(student, teacher), [[0, 2, 0, 3], [2, 3, 3, 4]])


def test_align_offsets_cuts_at_a_gap_only_where_the_other_side_has_the_same_gap():
    # characters 2:3 are claimed by no token (an NFC normaliser's composed accent): its owner is unknown
    with_gap = np.array([[0, 2], [3, 5], [5, 6]])
    clean = np.array([[0, 2], [2, 3], [3, 5], [5, 6]])
    np.testing.assert_array_equal(align_offsets(with_gap, clean), [[0, 2, 0, 3], [2, 3, 3, 4]])
    np.testing.assert_array_equal(
        align_offsets(with_gap, with_gap), [[0, 1, 0, 1], [1, 2, 1, 2], [2, 3, 2, 3]]
    )


def test_align_offsets_empty_tokens_leftovers_and_degenerate_inputs():
    # an empty token joins what precedes it; one at the start joins the first segment
    student = np.array([[0, 0], [0, 2], [2, 2], [2, 5]])
    teacher = np.array([[0, 2], [2, 5]])
    np.testing.assert_array_equal(align_offsets(student, teacher), [[0, 3, 0, 1], [3, 4, 1, 2]])
    # the teacher does not cover the trailing text: leftovers join the last segment
    np.testing.assert_array_equal(align_offsets([[0, 1], [1, 3]], [[0, 1]]), [[0, 2, 0, 1]])
    # no common boundary: one segment
    np.testing.assert_array_equal(align_offsets([[0, 3]], [[0, 1], [1, 2]]), [[0, 1, 0, 2]])
    assert align_offsets(np.zeros((0, 2)), np.zeros((0, 2))).shape == (0, 4)
    np.testing.assert_array_equal(align_offsets([[0, 2]], np.zeros((0, 2))), [[0, 1, 0, 0]])


def test_align_offsets_rejects_bad_offsets():
    with pytest.raises(ValueError, match="shape"):
        align_offsets(np.zeros((3, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="start <= end"):
        align_offsets([[2, 1]], [[0, 2]])


# ---------------------------------------------------------------------------------------------------------
# Real tokenizers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", PAIRS, ids=["-".join(pair) for pair in PAIRS])
def test_segments_cover_both_sides_and_spell_the_same_text(tokenizers, pair):
    student_name, teacher_name = pair
    student, teacher = tokenizers[student_name], tokenizers[teacher_name]
    for text in CORPUS:
        segments = align_tokens(text, student, teacher)
        student_ids = student(text, add_special_tokens=False)["input_ids"]
        teacher_ids = teacher(text, add_special_tokens=False)["input_ids"]
        # ordered, contiguous, covering both sequences, at least one token per side
        assert segments[0][0][0] == 0 and segments[0][1][0] == 0
        assert segments[-1][0][1] == len(student_ids) and segments[-1][1][1] == len(teacher_ids)
        for (previous_s, previous_t), (current_s, current_t) in itertools.pairwise(segments):
            assert current_s[0] == previous_s[1] and current_t[0] == previous_t[1]
        assert all(s1 > s0 and t1 > t0 for (s0, s1), (t0, t1) in segments)
        # both sides spell the same string in every segment, and together the whole text
        student_strings = segment_strings(
            student, KIND[student_name], student_ids, [s for s, _ in segments], text
        )
        teacher_strings = segment_strings(
            teacher, KIND[teacher_name], teacher_ids, [t for _, t in segments], text
        )
        assert student_strings == teacher_strings, text
        spelled = "".join(student_strings).encode("utf-8", "surrogateescape").decode("utf-8")
        assert unicodedata.normalize("NFC", spelled) == unicodedata.normalize("NFC", text)


@pytest.mark.parametrize("pair", PAIRS, ids=["-".join(pair) for pair in PAIRS])
def test_more_student_tokens_get_a_signal_than_with_trl_gold(tokenizers, pair):
    """Share of student tokens in 1:1 segments (own distribution vs a teacher distribution over the same
    text). GOLD aligns by byte offsets when both tokenizers are ByteLevel and positionally otherwise; a
    positional pair counts only when both tokens spell the same text span."""
    from trl.experimental.gold.gold_trainer import ULDLoss
    from trl.experimental.utils import encode_with_byte_offsets, is_byte_level_tokenizer

    student, teacher = (tokenizers[name] for name in pair)
    byte_level = all(is_byte_level_tokenizer(t.backend_tokenizer) for t in (student, teacher))
    ours = gold = 0
    for text, alignment in zip(CORPUS, align_texts(CORPUS, student, teacher)):
        ours_here = one_to_one_tokens(alignment.segments)
        if byte_level:
            ((_, student_offsets),) = encode_with_byte_offsets(student.backend_tokenizer, [text])
            ((_, teacher_offsets),) = encode_with_byte_offsets(teacher.backend_tokenizer, [text])
            groups = ULDLoss._align_by_byte_offsets(student_offsets, teacher_offsets)
            gold_here = sum(len(s) == 1 and len(t) == 1 for s, t in zip(*groups))
        else:
            student_encoded, teacher_encoded = (encode_with_offsets([text], t)[0] for t in (student, teacher))
            shared = min(len(student_encoded.ids), len(teacher_encoded.ids))
            same_span = student_encoded.offsets[:shared] == teacher_encoded.offsets[:shared]
            gold_here = int(same_span.all(1).sum())
        assert ours_here >= gold_here, text
        ours, gold = ours + ours_here, gold + gold_here
    assert ours >= gold
    if not byte_level:  # where GOLD falls back to positions, ours is far ahead
        assert ours > 3 * gold


def reference_anchors(student_pieces, teacher_pieces):
    """SimCT's released alignment (methods.md §8.1 step 5): greedy walk over per-token decoded pieces."""
    anchors, i, j = [], 0, 0
    student_text, teacher_text = student_pieces[0], teacher_pieces[0]
    while i < len(student_pieces) and j < len(teacher_pieces):
        equal = student_text == teacher_text
        if equal and student_pieces[i] == teacher_pieces[j]:
            anchors.append((i, j))
        advance_student = len(student_text) <= len(teacher_text)
        advance_teacher = len(teacher_text) <= len(student_text)
        i, j = i + advance_student, j + advance_teacher
        if advance_student and i < len(student_pieces):
            student_text += student_pieces[i]
        if advance_teacher and j < len(teacher_pieces):
            teacher_text += teacher_pieces[j]
    return anchors


@pytest.mark.parametrize(
    "pair", [("qwen3", "llama3"), ("gpt2", "pythia"), ("qwen3", "char"), ("llama3", "gpt2")]
)
def test_anchors_match_the_per_token_decode_route_on_ascii(tokenizers, pair):
    student, teacher = (tokenizers[name] for name in pair)
    for text, alignment in zip(ASCII_CORPUS, align_texts(ASCII_CORPUS, student, teacher)):
        pieces = [
            [tokenizer.decode([index], clean_up_tokenization_spaces=False) for index in ids.tolist()]
            for tokenizer, ids in ((student, alignment.student_ids), (teacher, alignment.teacher_ids))
        ]
        ours = [(int(s0), int(t0)) for s0, _, t0, _ in alignment.segments[alignment.anchors]]
        assert ours == reference_anchors(*pieces), text


def test_byte_offsets_from_ids_agree_with_re_encoding(tokenizers):
    for tokenizer in tokenizers.values():
        for encoded, text in zip(encode_with_offsets(CORPUS, tokenizer), CORPUS):
            decoded = tokenizer.decode(encoded.ids.tolist(), clean_up_tokenization_spaces=False)
            if decoded != text:  # a normaliser (NFC) rewrote the text: compare on the decoded text
                encoded = encode_with_offsets([decoded], tokenizer)[0]
            np.testing.assert_array_equal(
                byte_offsets_from_ids(encoded.ids, tokenizer, decoded), encoded.offsets
            )
    with pytest.raises(ValueError, match="re-encode"):
        byte_offsets_from_ids([9707], tokenizers["qwen3"], "Hello!")


def test_align_texts_appends_the_eos_anchor_and_stats(tokenizers):
    student, teacher = tokenizers["qwen3"], tokenizers["mistral"]
    (alignment,) = align_texts(["Hello world, 😀!"], student, teacher, append_eos=True)
    assert (
        alignment.student_ids[-1] == student.eos_token_id
        and alignment.teacher_ids[-1] == teacher.eos_token_id
    )
    n_s, n_t = len(alignment.student_ids), len(alignment.teacher_ids)
    np.testing.assert_array_equal(alignment.segments[-1], [n_s - 1, n_s, n_t - 1, n_t])
    assert alignment.anchors[-1]
    # "Hello" (Qwen) vs "▁Hello" (Mistral prefix space) spell different bytes: 1:1 but not an anchor
    assert tuple(alignment.segments[0]) == (0, 1, 0, 1) and not alignment.anchors[0]
    assert alignment.anchors[1]  # "Ġworld" / "▁world"
    stats = alignment_stats(alignment.segments, alignment.anchors)
    assert stats["align_ratio"] == 1.0  # the EOS anchor closes everything
    assert 0 < stats["anchor"] < stats["one_to_one"] <= 1
    with pytest.raises(ValueError, match="eos_token"):
        align_texts(["x"], tokenizers["gpt2"], teacher, append_eos=True)  # GPT-2's file has no EOS configured


def test_simct_segments_fold_runs_into_their_closing_anchor():
    segments = np.array([[0, 1, 0, 1], [1, 3, 1, 2], [3, 4, 2, 4], [4, 5, 4, 5], [5, 6, 5, 6], [6, 8, 6, 7]])
    anchors = np.array([True, False, False, True, True, False])
    np.testing.assert_array_equal(
        simct_segments(segments, anchors), [[0, 1, 0, 1], [1, 5, 1, 5], [5, 6, 5, 6]]
    )  # the trailing non-anchor segment is dropped
    np.testing.assert_array_equal(simct_segments(segments, anchors, spans=False), segments[anchors])
    stats = alignment_stats(segments, anchors)
    assert stats == {"one_to_one": 3 / 8, "anchor": 3 / 8, "align_ratio": 6 / 8}
    with pytest.raises(ValueError, match="anchors"):
        simct_segments(segments, anchors[:-1])


# ---------------------------------------------------------------------------------------------------------
# Shared vocabulary
# ---------------------------------------------------------------------------------------------------------


def brute_force_raw_vocabulary(student, teacher, student_kind, teacher_kind):
    def keyed(tokenizer, kind):
        special = set(tokenizer.all_special_ids) | {
            i for i, t in tokenizer.added_tokens_decoder.items() if t.special
        }
        return {
            (piece.replace("Ġ", "▁") if kind == "byte" else piece): index
            for piece, index in tokenizer.get_vocab().items()
            if index not in special
        }

    student_keys, teacher_keys = keyed(student, student_kind), keyed(teacher, teacher_kind)
    return {(index, teacher_keys[key]) for key, index in student_keys.items() if key in teacher_keys}


@pytest.mark.parametrize("pair", [("qwen3", "mistral"), ("pythia", "char"), ("mistral", "gpt2")])
def test_shared_vocabulary_raw_matches_brute_force(tokenizers, pair):
    student, teacher = (tokenizers[name] for name in pair)
    student_ids, teacher_ids = shared_vocabulary(student, teacher, include_eos=False)
    assert set(zip(student_ids.tolist(), teacher_ids.tolist())) == brute_force_raw_vocabulary(
        student, teacher, KIND[pair[0]], KIND[pair[1]]
    )
    with_eos = shared_vocabulary(student, teacher)
    if student.eos_token_id is not None and teacher.eos_token_id is not None:  # the forced EOS pair, last
        assert (with_eos[0][-1], with_eos[1][-1]) == (student.eos_token_id, teacher.eos_token_id)
        assert len(with_eos[0]) == len(student_ids) + 1
    else:  # GPT-2's file sets no EOS: nothing to force
        assert with_eos[0].equal(student_ids) and with_eos[1].equal(teacher_ids)


def test_shared_vocabulary_decoded_matches_real_text_and_is_cached(tokenizers):
    from trl_opd.cross_tokenizer import _shared_pairs

    qwen, mistral = tokenizers["qwen3"], tokenizers["mistral"]
    raw = set(zip(*(ids.tolist() for ids in shared_vocabulary(qwen, mistral))))
    hits = _shared_pairs.cache_info().hits
    decoded_ids = shared_vocabulary(qwen, mistral, mode="decoded", include_eos=False)
    assert _shared_pairs.cache_info().hits == hits
    assert shared_vocabulary(qwen, mistral, mode="decoded", include_eos=False)[0].equal(decoded_ids[0])
    assert _shared_pairs.cache_info().hits == hits + 1
    decoded = set(zip(*(ids.tolist() for ids in decoded_ids)))
    newline, e_acute = (qwen.convert_tokens_to_ids(p) for p in ("Ċ", "Ã©"))
    assert (newline, mistral.convert_tokens_to_ids("<0x0A>")) in decoded - raw
    assert (e_acute, mistral.convert_tokens_to_ids("é")) in decoded - raw
    assert (qwen.convert_tokens_to_ids("ĠHello"), mistral.convert_tokens_to_ids("▁Hello")) in raw & decoded
    student_ids, teacher_ids = zip(*sorted(decoded))
    assert len(set(student_ids)) == len(student_ids) and len(set(teacher_ids)) == len(teacher_ids)
    assert oracle_bytes(qwen, "byte", student_ids) == oracle_bytes(mistral, "sentencepiece", teacher_ids)


def test_token_table_rejects_tokenizers_without_offsets(tokenizers):
    with pytest.raises(ValueError, match="fast"):
        token_table(types.SimpleNamespace(is_fast=False))
    with pytest.raises(ValueError, match="list of strings"):
        encode_with_offsets("one text", tokenizers["gpt2"])
    with pytest.raises(ValueError, match="mode"):
        shared_vocabulary(tokenizers["gpt2"], tokenizers["pythia"], mode="exact")


# ---------------------------------------------------------------------------------------------------------
# Losses against brute force (float64, explicit loops)
# ---------------------------------------------------------------------------------------------------------

# two examples; the student has 5 and 3 real positions, the teacher 6 and 3; the rest is padding
SEGMENTS = torch.tensor(
    [[0, 0, 1, 0, 1], [0, 1, 3, 1, 2], [0, 3, 4, 2, 5], [0, 4, 5, 5, 6], [1, 0, 2, 0, 2], [1, 2, 3, 2, 3]]
)
SHARED = (torch.tensor([0, 2, 3, 5]), torch.tensor([1, 4, 0, 8]))


def loss_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    student_logits = (2 * torch.randn(2, 6, 7, generator=generator, dtype=torch.float64)).requires_grad_()
    teacher_logits = (2 * torch.randn(2, 7, 9, generator=generator, dtype=torch.float64)).requires_grad_()
    student_ids = torch.randint(0, 7, (2, 6), generator=generator)
    teacher_ids = torch.randint(0, 9, (2, 7), generator=generator)
    return student_logits, teacher_logits, student_ids, teacher_ids


def log_softmax_list(values):
    """Textbook log-softmax of a list of scalar tensors."""
    log_normaliser = torch.log(sum(torch.exp(v) for v in values))
    return [v - log_normaliser for v in values]


def brute_force_simct(student_logits, teacher_logits, student_ids, teacher_ids, temperature, span_score):
    """The reference's wide rows: per example |V∩| columns plus one column per span of that example, -1e9
    in the columns of the other spans; reverse KL with explicit sums."""

    def scores(logits, ids, b, start, end, columns):
        def at(position, token):
            value = logits[b, position, token] / temperature
            if span_score == "logprob_mean":
                value = value - torch.log(
                    sum(torch.exp(logits[b, position, u] / temperature) for u in range(logits.shape[-1]))
                )
            return value

        shared = [at(start, column) for column in columns.tolist()]
        span = sum(at(position, ids[b, position]) for position in range(start, end)) / (end - start)
        return shared, span

    losses = []
    for g, (b, s0, s1, t0, t1) in enumerate(SEGMENTS.tolist()):
        spans_of_example = [
            h
            for h, (b2, a0, a1, c0, c1) in enumerate(SEGMENTS.tolist())
            if b2 == b and (a1 - a0 > 1 or c1 - c0 > 1)
        ]
        student_shared, student_span = scores(student_logits, student_ids, b, s0, s1, SHARED[0])
        teacher_shared, teacher_span = scores(teacher_logits.detach(), teacher_ids, b, t0, t1, SHARED[1])
        student_row = student_shared + [
            student_span if h == g else torch.tensor(-1e9, dtype=torch.float64) for h in spans_of_example
        ]
        teacher_row = teacher_shared + [
            teacher_span if h == g else torch.tensor(-1e9, dtype=torch.float64) for h in spans_of_example
        ]
        log_p, log_q = log_softmax_list(student_row), log_softmax_list(teacher_row)
        losses.append(sum(torch.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q)))
    return torch.stack(losses)


@pytest.mark.parametrize("span_score", ["logit_mean", "logprob_mean"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_simct_loss_matches_brute_force_values_and_gradients(span_score, temperature):
    inputs = loss_inputs()
    ours = simct_loss(*inputs, SEGMENTS, SHARED, temperature=temperature, span_score=span_score)
    (grad_ours,) = torch.autograd.grad(ours.sum(), inputs[0])
    expected = brute_force_simct(*inputs, temperature, span_score)
    (grad_expected,) = torch.autograd.grad(expected.sum(), inputs[0])
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_expected, rtol=1e-10, atol=1e-12)
    assert (ours > 0).all()
    # padding positions (student 5 of example 0, 3.. of example 1) receive no gradient
    assert grad_ours[0, 5].abs().sum() == 0 and grad_ours[1, 3:].abs().sum() == 0
    # every position inside a span gets gradient through the span column
    assert grad_ours[0, 2].abs().sum() > 0


def test_simct_loss_teacher_is_detached_padding_is_ignored_and_reductions():
    inputs = loss_inputs(1)
    student_logits, teacher_logits, student_ids, _ = inputs
    per_segment = simct_loss(*inputs, SEGMENTS, SHARED)
    per_segment.sum().backward()
    assert teacher_logits.grad is None
    with torch.no_grad():
        student_logits[1, 4] += 100.0  # padding
        teacher_logits[0, 6] -= 50.0
        student_ids[1, 5] = 3
    torch.testing.assert_close(simct_loss(*inputs, SEGMENTS, SHARED), per_segment.detach())
    torch.testing.assert_close(simct_loss(*inputs, SEGMENTS, SHARED, reduction="sum"), per_segment.sum())
    mean = simct_loss(*inputs, SEGMENTS, SHARED, reduction="token_mean")
    torch.testing.assert_close(mean, per_segment.sum() / 8)  # 8 student tokens in the segments
    given = simct_loss(*inputs, SEGMENTS, SHARED, reduction="token_mean", num_items=20)
    torch.testing.assert_close(given, per_segment.sum() / 20)


def test_losses_compute_bfloat16_logits_in_float32():
    student_logits, teacher_logits, student_ids, teacher_ids = loss_inputs(6)
    low = student_logits.detach().bfloat16().requires_grad_(), teacher_logits.detach().bfloat16()
    for loss, extra in ((simct_loss, (SHARED,)), (uld_loss, ())):
        value = loss(*low, student_ids, teacher_ids, SEGMENTS, *extra)
        assert value.dtype == torch.float32
        reference = loss(*(x.double() for x in low), student_ids, teacher_ids, SEGMENTS, *extra)
        torch.testing.assert_close(value.double(), reference, rtol=1e-5, atol=1e-6)
        (gradient,) = torch.autograd.grad(value.sum(), low[0])
        assert gradient.dtype == torch.bfloat16 and gradient.abs().sum() > 0


def test_simct_loss_is_zero_for_identical_rows_and_plain_kl_on_one_to_one_rows():
    student_logits, _, student_ids, _ = loss_inputs(2)
    same = simct_loss(
        student_logits,
        student_logits,
        student_ids,
        student_ids,
        SEGMENTS[:, [0, 1, 2, 1, 2]],
        (SHARED[0], SHARED[0]),
    )
    torch.testing.assert_close(same, torch.zeros(6, dtype=torch.float64))
    student_logits, teacher_logits, student_ids, teacher_ids = loss_inputs(3)
    one_to_one = SEGMENTS[[0, 3, 5]]
    ours = simct_loss(student_logits, teacher_logits, student_ids, teacher_ids, one_to_one, SHARED)
    for value, (b, s0, _, t0, _) in zip(ours, one_to_one.tolist()):
        p = torch.softmax(student_logits[b, s0, SHARED[0]], -1)
        q = torch.softmax(teacher_logits[b, t0, SHARED[1]], -1)
        torch.testing.assert_close(value, (p * (p / q).log()).sum())


def brute_force_uld(student_logits, teacher_logits, student_ids, teacher_ids, temperature, merge):
    def merged(logits, ids, b, start, end):
        def probs(position):
            exps = [torch.exp(logits[b, position, v] / temperature) for v in range(logits.shape[-1])]
            return [e / sum(exps) for e in exps]

        base = start if merge == "observed" else end - 1
        scale = 1.0
        for position in range(start, end):
            if position != base:
                scale = scale * probs(position)[ids[b, position]]
        return sorted((p * scale for p in probs(base)), key=lambda p: -p.item())

    losses = []
    for b, s0, s1, t0, t1 in SEGMENTS.tolist():
        p, q = (
            merged(student_logits, student_ids, b, s0, s1),
            merged(teacher_logits.detach(), teacher_ids, b, t0, t1),
        )
        width = max(len(p), len(q))
        p, q = p + [0.0] * (width - len(p)), q + [0.0] * (width - len(q))
        losses.append(sum(abs(a - c) for a, c in zip(p, q)))
    return torch.stack(losses)


@pytest.mark.parametrize("merge", ["observed", "bayesian"])
@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_uld_loss_matches_brute_force_values_and_gradients(merge, temperature):
    inputs = loss_inputs(4)
    ours = uld_loss(*inputs, SEGMENTS, temperature=temperature, merge=merge)
    expected = brute_force_uld(*inputs, temperature, merge)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    (grad_ours,) = torch.autograd.grad(ours.sum(), inputs[0])
    (grad_expected,) = torch.autograd.grad(expected.sum(), inputs[0])
    torch.testing.assert_close(grad_ours, grad_expected, rtol=1e-10, atol=1e-12)
    assert grad_ours[1, 3:].abs().sum() == 0


def test_uld_loss_equals_trl_gold_uld_on_the_same_alignment(tokenizers, tmp_path):
    """GOLD's ``bayesian`` merge uses our convention (logits at k predict token k); with EOS skipping and
    cross-entropy off, GOLD's per-example loss is the mean of our per-segment values."""
    from trl.experimental.gold import GOLDConfig
    from trl.experimental.gold.gold_trainer import ULDLoss

    student, teacher = tokenizers["qwen3"], tokenizers["llama3"]
    text = "The café’s crab 🦀 costs 12,345 yen."
    s_encoded, t_encoded = (encode_with_offsets([text], t)[0] for t in (student, teacher))
    segments = align_offsets(s_encoded.offsets, t_encoded.offsets)
    n_s, n_t, vocab_s, vocab_t = len(s_encoded.ids), len(t_encoded.ids), 50, 40
    generator = torch.Generator().manual_seed(5)
    student_ids = torch.randint(0, vocab_s, (1, n_s), generator=generator)
    teacher_ids = torch.randint(0, vocab_t, (1, n_t), generator=generator)
    student_logits = torch.randn(1, n_s + 1, vocab_s, generator=generator, dtype=torch.float64)
    teacher_logits = torch.randn(1, n_t + 1, vocab_t, generator=generator, dtype=torch.float64)

    def gold_side(ids, offsets):  # one prompt token, then the completion
        labels = torch.cat([torch.tensor([[-100]]), ids], 1)
        input_ids = torch.cat([torch.tensor([[0]]), ids], 1)
        byte_offsets = torch.cat([torch.zeros(1, 1, 2, dtype=torch.long), torch.from_numpy(offsets)[None]], 1)
        return labels, input_ids, byte_offsets

    config = GOLDConfig(  # GOLD's defaults: no cross-entropy, temperatures 1, extended (byte-offset) ULD
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        use_uld_loss=True,
        uld_skip_student_eos=False,
        uld_skip_teacher_eos=False,
        uld_token_merge_strategy="bayesian",
    )
    s_labels, s_inputs, s_offsets = gold_side(student_ids, s_encoded.offsets)
    t_labels, t_inputs, t_offsets = gold_side(teacher_ids, t_encoded.offsets)
    gold = ULDLoss(config)(
        student_logits, teacher_logits, s_labels, t_labels, s_inputs, t_inputs, s_offsets, t_offsets
    )
    ours = uld_loss(
        student_logits[:, :n_s],
        teacher_logits[:, :n_t],
        student_ids,
        teacher_ids,
        stack_segments([segments]),
        merge="bayesian",
    )
    assert len(segments) < n_s  # the text has multi-token segments
    torch.testing.assert_close(ours.mean(), gold)


def test_losses_reject_bad_input():
    student_logits, teacher_logits, student_ids, teacher_ids = loss_inputs()
    args = (student_logits, teacher_logits, student_ids, teacher_ids)
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        simct_loss(student_logits[0], teacher_logits, student_ids, teacher_ids, SEGMENTS, SHARED)
    with pytest.raises(ValueError, match="ids must be"):
        uld_loss(student_logits, teacher_logits, student_ids[:, :3], teacher_ids, SEGMENTS)
    with pytest.raises(ValueError, match="s0 < s1"):
        simct_loss(*args, torch.tensor([[0, 2, 2, 0, 1]]), SHARED)
    with pytest.raises(ValueError, match="t0 < t1"):
        uld_loss(*args, torch.tensor([[0, 0, 1, 0, 9]]))
    with pytest.raises(ValueError, match="batch index"):
        simct_loss(*args, torch.tensor([[2, 0, 1, 0, 1]]), SHARED)
    with pytest.raises(ValueError, match="int64"):
        simct_loss(*args, SEGMENTS[:, :4], SHARED)
    with pytest.raises(ValueError, match="empty"):
        uld_loss(*args, SEGMENTS[:0])
    with pytest.raises(ValueError, match="swapped"):
        simct_loss(*args, SEGMENTS, (SHARED[1], SHARED[0]))
    with pytest.raises(ValueError, match="temperature"):
        simct_loss(*args, SEGMENTS, SHARED, temperature=0.0)
    with pytest.raises(ValueError, match="span_score"):
        simct_loss(*args, SEGMENTS, SHARED, span_score="mean")
    with pytest.raises(ValueError, match="merge"):
        uld_loss(*args, SEGMENTS, merge="last")
    with pytest.raises(ValueError, match="reduction"):
        uld_loss(*args, SEGMENTS, reduction="mean")


def test_stack_segments_adds_the_batch_index():
    stacked = stack_segments(
        [np.array([[0, 1, 0, 2]]), np.zeros((0, 4)), np.array([[0, 2, 0, 1], [2, 3, 1, 2]])]
    )
    assert stacked.dtype == torch.long
    assert stacked.tolist() == [[0, 0, 1, 0, 2], [2, 0, 2, 0, 1], [2, 2, 3, 1, 2]]


# ---------------------------------------------------------------------------------------------------------
# Per-segment weighting (OPDTrainer's token weighting with one segment per token)
# ---------------------------------------------------------------------------------------------------------


def test_segment_position_weights_are_token_weights_on_one_to_one_segments_and_means_on_spans():
    from trl_opd.cross_tokenizer import segment_position_weights
    from trl_opd.weighting import position_weights

    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    token = position_weights(mask, direction="increasing")
    one_to_one = torch.tensor([[0, k, k + 1, k, k + 1] for k in range(5)] + [[1, k, k + 1, k, k + 1] for k in range(3)])
    torch.testing.assert_close(segment_position_weights(one_to_one, mask, direction="increasing"),
                               token[one_to_one[:, 0], one_to_one[:, 1]])
    spans = torch.tensor([[0, 0, 3, 0, 1], [0, 3, 5, 1, 4], [1, 0, 3, 0, 2]])
    expected = torch.stack([token[0, :3].mean(), token[0, 3:5].mean(), token[1, :3].mean()])
    torch.testing.assert_close(segment_position_weights(spans, mask, direction="increasing"), expected)


def test_segment_tip_mask_keeps_a_share_of_each_rows_segments():
    from trl_opd.cross_tokenizer import segment_grid, segment_tip_mask

    segments = torch.tensor([[0, 0, 1, 0, 1], [0, 1, 3, 1, 2], [0, 3, 4, 2, 3], [0, 4, 5, 3, 5], [1, 0, 2, 0, 1]])
    rank, valid = segment_grid(segments, 3)
    assert rank.tolist() == [0, 1, 2, 3, 0] and valid.sum(1).tolist() == [4, 1, 0]
    divergence = torch.tensor([0.1, 0.5, 0.3, 0.2, 0.05])
    entropy = torch.rand(3, 5)
    kept = segment_tip_mask(segments, entropy, divergence, 3, ratio=0.5, strategy="divergence_only")
    assert kept.tolist() == [False, True, True, False, True]  # top 2 of row 0, at least 1 of row 1
    kept = segment_tip_mask(segments, entropy, divergence, 3, ratio=0.5, strategy="divergence_only", scope="batch")
    assert kept.tolist() == [False, True, True, False, False]  # ⌊0.5 · 5⌋ = 2 over the micro-batch
    # soft-OR reads each segment's entropy at its first student position
    flat = torch.zeros(3, 5)
    flat[0, 3] = 5.0
    kept = segment_tip_mask(segments, flat, torch.zeros(5), 3, ratio=0.25, strategy="soft_or")
    assert kept.tolist() == [False, False, True, False, True]
    assert segment_tip_mask(segments[:0], entropy, divergence[:0], 3, ratio=0.5).shape == (0,)


@pytest.mark.parametrize("reduction", ["token_mean", "token_mean_microbatch", "sequence_mean", "weighted_mean"])
def test_segment_loss_coefficients_match_brute_force(reduction):
    from trl_opd.cross_tokenizer import segment_loss_coefficients

    segments = torch.tensor([[0, 0, 1, 0, 1], [0, 1, 4, 1, 2], [1, 0, 2, 0, 1], [1, 2, 3, 1, 3]])
    row_tokens = torch.tensor([5, 3, 0])  # row 0 has an uncovered token, row 2 is empty
    weights = torch.tensor([1.0, 0.5, 0.0, 2.0])
    got = segment_loss_coefficients(segments, row_tokens, weights, reduction=reduction)
    sizes = [1, 3, 2, 1]
    expected = {
        "token_mean": [w / 8 for w in weights.tolist()],
        "token_mean_microbatch": [w / 8 for w in weights.tolist()],
        "sequence_mean": [w / (row_tokens[b].item() * 2) for w, b in zip(weights.tolist(), [0, 0, 1, 1])],
        "weighted_mean": [w / (1 + 1.5 + 0 + 2) for w in weights.tolist()],
    }[reduction]
    torch.testing.assert_close(got, torch.tensor(expected))
    if reduction == "token_mean":
        torch.testing.assert_close(segment_loss_coefficients(segments, row_tokens, reduction=reduction, num_items=4.0),
                                   torch.full((4,), 0.25))
    if reduction == "weighted_mean":
        assert segment_loss_coefficients(segments, row_tokens, torch.zeros(4), reduction=reduction).sum() == 0
        unweighted = segment_loss_coefficients(segments, row_tokens, reduction=reduction)
        torch.testing.assert_close(unweighted, torch.full((4,), 1 / sum(sizes)))
    with pytest.raises(ValueError, match="reduction"):
        segment_loss_coefficients(segments, row_tokens, reduction="sum")


def test_segment_teacher_coverage_matches_brute_force():
    from trl_opd.cross_tokenizer import segment_teacher_coverage

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    teacher_ids = torch.tensor([[5, 1, 6, 2], [3, 0, 0, 0]])
    shared = torch.tensor([0, 1, 2, 3])  # 4, 5, 6 are the teacher's own pieces
    segments = torch.tensor([[0, 0, 1, 0, 1], [0, 1, 4, 1, 2], [0, 4, 5, 2, 4], [1, 0, 1, 0, 1]])
    got = segment_teacher_coverage(logits, teacher_ids, segments, shared, temperature=2.0)
    probs = torch.softmax(logits / 2.0, dim=-1)
    expected = [
        probs[0, 0, :4].sum(),                      # 1:1 row: V∩ only (its token 5 is outside V∩, no span column)
        probs[0, 1, :4].sum(),                      # span whose first teacher token (1) is already in V∩
        probs[0, 2, :4].sum() + probs[0, 2, 6],     # span whose first teacher token (6) is the span column's
        probs[1, 0, :4].sum(),
    ]
    torch.testing.assert_close(got, torch.stack(expected).float())


def test_simct_exclusive_spans_drops_the_first_tokens_columns_from_span_rows_only():
    from trl_opd.cross_tokenizer import _simct_rows

    torch.manual_seed(0)
    student_logits = torch.randn(1, 4, 6, requires_grad=True)
    teacher_logits = torch.randn(1, 3, 5)
    student_ids = torch.tensor([[1, 2, 3, 0]])
    teacher_ids = torch.tensor([[4, 2, 0]])
    shared = (torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]))
    segments = torch.tensor([[0, 0, 2, 0, 1], [0, 2, 3, 1, 2], [0, 3, 4, 2, 3]])  # a 2:1 span, then 1:1 rows
    plain = simct_loss(student_logits, teacher_logits, student_ids, teacher_ids, segments, shared)
    exclusive = simct_loss(student_logits, teacher_logits, student_ids, teacher_ids, segments, shared,
                           exclusive_spans=True)
    torch.testing.assert_close(exclusive[1:], plain[1:])  # 1:1 rows are untouched
    batch, s0, s1, t0, t1 = segments.unbind(-1)
    is_span = torch.tensor([True, False, False])
    s_row = _simct_rows(student_logits, student_ids, batch, s0, s1, shared[0], is_span, 1.0, "logit_mean")[0]
    t_row = _simct_rows(teacher_logits, teacher_ids, batch, t0, t1, shared[1], is_span, 1.0, "logit_mean")[0]
    keep = torch.tensor([True, False, True, True, True])  # student's first token 1 dropped; teacher's 4 is not in V∩
    s_log, t_log = torch.log_softmax(s_row[keep], -1), torch.log_softmax(t_row[keep], -1)
    torch.testing.assert_close(exclusive[0], (s_log.exp() * (s_log - t_log)).sum())
