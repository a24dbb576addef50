"""Cross-tokenizer alignment + loss time per 4,096-token rollout: trl_opd (SimCT, and its ULD) vs TRL GOLD.

Same rollout text, same tokenizers, one run side by side (CPU, random logits at the real vocabulary sizes):

* **trl_opd**: decode the sampled ids once; ``align_texts`` (both tokenizers, byte offsets, finest segments,
  anchors, EOS) + ``simct_segments`` + ``stack_segments``; then ``simct_loss`` forward + backward (and, for
  reference, ``uld_loss``). The per-tokenizer tables and the shared vocabulary are built once per pair and
  reported apart (``setup_once_s``).
* **TRL GOLD** (``trl.experimental.gold``): decode once; student byte offsets from the sampled ids
  (``GOLDTrainer._maybe_add_completion_byte_offsets``), teacher inputs with byte offsets
  (``build_teacher_inputs_from_texts``), ``ULDLoss._align_by_byte_offsets``; then ``ULDLoss`` forward +
  backward (extended ULD, ``observed`` merge, no EOS skipping, no cross-entropy).

The rollout is ``--tokens`` student tokens of MATH-500 reference solutions (bundled in trl_opd/eval/data).
The loss runs over the whole rollout in consecutive pieces of about ``--chunk`` student tokens, cut at
segment boundaries, for both libraries alike. trl_opd's per-token cost does not depend on the cut; GOLD's
does: its ULDLoss indexes one row of the [n, V] probabilities per aligned group, and the backward of each such
index writes a dense [n, V] gradient, so one sequence costs O(n² V). Pieces therefore *favour* GOLD (a real
4,096-token completion in one piece would cost it 4096 / chunk times more); ``--scaling`` measures that growth
on single pieces. Times are wall seconds and process CPU seconds (less sensitive to other jobs on a shared
machine), medians over ``--repeats`` runs for the alignment and ``--loss-repeats`` for the losses. A
measurement, not a test.

    python bench/bench_alignment.py                       # writes bench/results/alignment_cpu.json
    python bench/bench_alignment.py --pairs gpt2:pythia --tokens 1024 --scaling
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer
from trl.experimental.gold import GOLDConfig
from trl.experimental.gold.gold_trainer import GOLDTrainer, ULDLoss, build_teacher_inputs_from_texts

from trl_opd import cross_tokenizer as ct

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "alignment_cpu.json"
TOKENIZERS = ROOT.parent / "shared" / "data" / "tokenizers"  # ../shared beside the checkout
SOLUTIONS = ROOT / "trl_opd" / "eval" / "data" / "math500" / "test.jsonl"
PROMPT = "Solve the problem and put the final answer in \\boxed{}."
# GOLD's defaults (extended byte-offset ULD, observed merge, no cross-entropy, temperatures 1), except that
# the pieces carry no EOS to skip
GOLD_CONFIG = GOLDConfig(
    output_dir=tempfile.gettempdir(),
    report_to="none",
    use_cpu=True,
    use_uld_loss=True,
    uld_skip_student_eos=False,
    uld_skip_teacher_eos=False,
)


def load_tokenizer(directory: Path):
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.eos_token is None:  # GPT-2's file configures none; GOLD and SimCT both append one
        tokenizer.eos_token = "<|endoftext|>"
    return tokenizer


def rollout_ids(tokenizer, tokens: int) -> list[int]:
    """The first ``tokens`` student tokens of the MATH-500 solutions, joined by blank lines."""
    solutions = [json.loads(line)["solution"] for line in SOLUTIONS.read_text().splitlines()]
    ids: list[int] = []
    for solution in solutions:
        ids += tokenizer(solution + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            return ids[:tokens]
    raise ValueError(f"The solutions hold fewer than {tokens} tokens.")


def timed(function, repeats: int) -> tuple[dict, object]:
    """Median wall and CPU seconds of ``function()`` over ``repeats`` runs, and its last result."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}, result


def add(*timings: dict) -> dict:
    return {key: sum(t[key] for t in timings) for key in ("wall_s", "cpu_s")}


# ---------------------------------------------------------------------------------------------------------
# trl_opd
# ---------------------------------------------------------------------------------------------------------


def ours_align(student, teacher, ids):
    text = student.decode(ids, clean_up_tokenization_spaces=False)
    (alignment,) = ct.align_texts([text], student, teacher, append_eos=True)
    groups = ct.simct_segments(alignment.segments, alignment.anchors)
    return alignment, ct.stack_segments([groups])


def loss_pieces(alignment, chunk: int) -> list[tuple[int, int, int, int, np.ndarray]]:
    """Consecutive pieces of the rollout (EOS left out) cut after SimCT segments: (s_lo, s_hi, t_lo, t_hi,
    the SimCT segments of the piece relative to its start)."""
    groups = ct.simct_segments(alignment.segments[:-1], alignment.anchors[:-1])
    pieces, first = [], 0
    while first < len(groups):
        s_lo, t_lo = groups[first, 0], groups[first, 2]
        last = first
        while last + 1 < len(groups) and groups[last + 1, 1] - s_lo <= chunk:
            last += 1
        piece = groups[first : last + 1] - np.array([s_lo, s_lo, t_lo, t_lo])
        pieces.append((int(s_lo), int(groups[last, 1]), int(t_lo), int(groups[last, 3]), piece))
        first = last + 1
    return pieces


def random_logits(positions: int, vocab: int, seed: int, grad: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(1, positions, vocab, generator=generator)).requires_grad_(grad)


def ours_loss(kind, pieces, logits, student_ids, teacher_ids, shared):
    """Forward + backward of the SimCT (or trl_opd ULD) loss over every piece; logits are pre-built."""
    for (s_lo, s_hi, t_lo, t_hi, piece), (student_logits, teacher_logits) in zip(pieces, logits):
        student_logits.grad = None
        args = (
            student_logits[:, 1:],
            teacher_logits[:, 1:],
            torch.as_tensor(student_ids[s_lo:s_hi])[None],
            torch.as_tensor(teacher_ids[t_lo:t_hi])[None],
            ct.stack_segments([piece]),
        )
        if kind == "simct":
            loss = ct.simct_loss(*args, shared, reduction="token_mean", num_items=s_hi - s_lo)
        else:
            loss = ct.uld_loss(*args, reduction="sum") / len(piece)
        loss.backward()


# ---------------------------------------------------------------------------------------------------------
# TRL GOLD
# ---------------------------------------------------------------------------------------------------------


def gold_align(student, teacher, ids):
    text = student.decode(ids, clean_up_tokenization_spaces=False)
    prompt_ids = student(PROMPT)["input_ids"]
    stub = types.SimpleNamespace(  # the attributes _maybe_add_completion_byte_offsets reads
        use_uld_loss=True,
        teacher_tokenizer=teacher,
        _tokenizer=student,
        uld_loss_fn=types.SimpleNamespace(use_extended_uld=True),
    )
    student_slice = {
        "input_ids": torch.tensor([prompt_ids + ids]),
        "labels": torch.tensor([[-100] * len(prompt_ids) + ids]),
    }
    GOLDTrainer._maybe_add_completion_byte_offsets(stub, student_slice)
    teacher_ids, teacher_labels, _, teacher_offsets = build_teacher_inputs_from_texts(
        teacher, [PROMPT], [text]
    )
    answer = teacher_labels[0] != -100
    student_offsets = student_slice["byte_offsets"][0, len(prompt_ids) :].tolist()
    groups = ULDLoss._align_by_byte_offsets(student_offsets, teacher_offsets[0, answer][:-1].tolist())
    return groups, teacher_ids[0, answer][:-1].tolist(), student_offsets, teacher_offsets[0, answer][:-1]


def gold_loss(pieces, logits, student_ids, teacher_ids, student_offsets, teacher_offsets):
    """Forward + backward of GOLD's ULDLoss on each piece, laid out as GOLD expects: one prompt position,
    then the piece's tokens as labels, with their byte offsets."""
    uld = ULDLoss(GOLD_CONFIG)

    def side(ids, offsets, lo, hi):
        tokens = torch.tensor([[0] + list(ids[lo:hi])])
        labels = tokens.clone()
        labels[0, 0] = -100
        byte_offsets = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.as_tensor(offsets[lo:hi])])[None]
        return labels, tokens, byte_offsets

    for (s_lo, s_hi, t_lo, t_hi, _), (student_logits, teacher_logits) in zip(pieces, logits):
        student_logits.grad = None
        s_labels, s_tokens, s_offsets = side(student_ids, student_offsets, s_lo, s_hi)
        t_labels, t_tokens, t_offsets = side(teacher_ids, teacher_offsets, t_lo, t_hi)
        loss = uld(
            student_logits, teacher_logits, s_labels, t_labels, s_tokens, t_tokens, s_offsets, t_offsets
        )
        loss.backward()


# ---------------------------------------------------------------------------------------------------------


def time_losses(rollout, pieces, repeats) -> dict:
    """Summed forward + backward time of each loss over the pieces (logits built outside the timing)."""
    alignment, results = rollout.alignment, {}
    for kind in ("simct", "uld", "gold"):
        timings = []
        for number, piece in enumerate(pieces):
            s_lo, s_hi, t_lo, t_hi, _ = piece
            logits = [
                (
                    random_logits(1 + s_hi - s_lo, rollout.vocab[0], 2 * number, True),
                    random_logits(1 + t_hi - t_lo, rollout.vocab[1], 2 * number + 1, False),
                )
            ]
            ids = (alignment.student_ids, alignment.teacher_ids)
            if kind == "gold":
                run = functools.partial(gold_loss, [piece], logits, *ids, *rollout.offsets)
            else:
                run = functools.partial(ours_loss, kind, [piece], logits, *ids, rollout.shared)
            timings.append(timed(run, repeats)[0])
            del logits, run
        results[kind] = add(*timings)
    return results


def bench_pair(student_name, teacher_name, args, first) -> dict:
    student, teacher = (load_tokenizer(args.tokenizers / name) for name in (student_name, teacher_name))
    ids = rollout_ids(student, args.tokens)

    setup = timed(
        lambda: (ct.token_table(student), ct.token_table(teacher), ct.shared_vocabulary(student, teacher)), 1
    )[0]
    shared = ct.shared_vocabulary(student, teacher)
    ours_align(student, teacher, ids), gold_align(student, teacher, ids)  # warm-up, untimed
    ours_align_time, (alignment, _) = timed(lambda: ours_align(student, teacher, ids), args.repeats)
    gold_align_time, (groups, gold_teacher_ids, student_offsets, teacher_offsets) = timed(
        lambda: gold_align(student, teacher, ids), args.repeats
    )
    n_student, n_teacher = len(alignment.student_ids) - 1, len(alignment.teacher_ids) - 1
    assert gold_teacher_ids == alignment.teacher_ids[:-1].tolist(), (
        "both libraries tokenise the teacher alike"
    )

    vocab_s, vocab_t = len(student), len(teacher)
    rollout = types.SimpleNamespace(
        alignment=alignment,
        shared=shared,
        vocab=(vocab_s, vocab_t),
        offsets=(student_offsets, teacher_offsets),
    )
    pieces = loss_pieces(alignment, args.chunk)
    results = time_losses(rollout, pieces, args.loss_repeats)
    scaling = {
        length: time_losses(rollout, loss_pieces(alignment, length)[:1], args.loss_repeats)
        for length in (args.scaling if first else [])
    }
    ours_total = add(ours_align_time, results["simct"])
    gold_total = add(gold_align_time, results["gold"])
    gold_one_to_one = sum(len(s) == 1 and len(t) == 1 for s, t in zip(*groups))
    return {
        "student": student_name,
        "teacher": teacher_name,
        "student_tokens": n_student,
        "teacher_tokens": n_teacher,
        "student_vocab": vocab_s,
        "teacher_vocab": vocab_t,
        "shared_vocab": len(shared[0]),
        "loss_pieces": len(pieces),
        "setup_once_s": setup,
        "trl_opd": {
            "align": ours_align_time,
            "simct_loss": results["simct"],
            "uld_loss": results["uld"],
            "total_simct": ours_total,
        },
        "trl_gold": {"align": gold_align_time, "uld_loss": results["gold"], "total": gold_total},
        "speedup_total": {k: gold_total[k] / ours_total[k] for k in ours_total},
        "speedup_align": {k: gold_align_time[k] / ours_align_time[k] for k in ours_total},
        "speedup_uld_loss_same_method": {k: results["gold"][k] / results["uld"][k] for k in ours_total},
        "student_tokens_in_1to1_segments": {
            "trl_opd": ct.alignment_stats(alignment.segments[:-1])["one_to_one"],
            "trl_gold": gold_one_to_one / n_student,
        },
        "simct_stats": ct.alignment_stats(alignment.segments, alignment.anchors),
        "single_piece_loss_scaling": {
            str(length): {"student_tokens": int(loss_pieces(alignment, length)[0][1]), **timings}
            for length, timings in scaling.items()
        },
    }


def write_markdown(report: dict, path: Path) -> str:
    """A Markdown summary of the JSON report (per pair: time per rollout, ratio, tokens that get a signal)."""
    lines = [
        "# Cross-tokenizer alignment + loss per rollout: trl_opd vs TRL GOLD",
        "",
        f"`python bench/bench_alignment.py` (defaults: {report['tokens']:,}-token rollouts of MATH-500 reference "
        f"solutions, loss in pieces of about {report['loss_chunk_tokens']} student tokens for both libraries) on a "
        f"shared {report['machine']} CPU, torch {report['torch']}, {report['threads']} thread. Times: alignment "
        f"(median of {report['repeats']}) plus loss forward + backward (random logits at the real vocabulary "
        "sizes), per rollout, in one run side by side; process CPU seconds are less sensitive to other jobs than "
        "wall seconds. The per-pair tables and the shared vocabulary are built once per tokenizer pair "
        "(`setup once`, not counted). GOLD = `trl.experimental.gold`: byte-offset alignment and `ULDLoss` "
        "(extended ULD, its default).",
        "",
        "| student → teacher | vocab S / T / shared | trl_opd SimCT: align + loss | GOLD: align + ULD loss "
        "| ratio (wall / CPU) | trl_opd ULD loss vs GOLD ULD loss (CPU) | setup once |",
        "|---|---|---|---|---|---|---|",
    ]
    for pair in report["pairs"]:
        ours, gold = pair["trl_opd"], pair["trl_gold"]
        lines.append(
            f"| {pair['student']} → {pair['teacher']} | {pair['student_vocab']:,} / {pair['teacher_vocab']:,} / "
            f"{pair['shared_vocab']:,} | {ours['align']['wall_s'] * 1e3:.0f} ms + {ours['simct_loss']['wall_s']:.1f} s "
            f"= {ours['total_simct']['wall_s']:.1f} s wall ({ours['total_simct']['cpu_s']:.1f} s CPU) | "
            f"{gold['align']['wall_s'] * 1e3:.0f} ms + {gold['uld_loss']['wall_s']:.1f} s = "
            f"{gold['total']['wall_s']:.1f} s wall ({gold['total']['cpu_s']:.1f} s CPU) | "
            f"**{pair['speedup_total']['wall_s']:.1f}× / {pair['speedup_total']['cpu_s']:.1f}×** | "
            f"{pair['speedup_uld_loss_same_method']['cpu_s']:.1f}× | {pair['setup_once_s']['wall_s']:.1f} s |"
        )
    lines += [
        "",
        "Alignment alone: "
        + "; ".join(
            f"{p['student']} → {p['teacher']} {p['speedup_align']['wall_s']:.1f}× faster than GOLD's"
            for p in report["pairs"]
        )
        + ".",
        "",
        "## Student tokens that receive a signal",
        "",
        "| student → teacher | tokens in 1:1 segments, trl_opd | tokens in 1:1 groups, GOLD | tokens in a compared "
        "segment, SimCT (spans included) |",
        "|---|---|---|---|",
    ]
    for pair in report["pairs"]:
        shares = pair["student_tokens_in_1to1_segments"]
        lines.append(
            f"| {pair['student']} → {pair['teacher']} | {100 * shares['trl_opd']:.1f}% | "
            f"{100 * shares['trl_gold']:.1f}% | {100 * pair['simct_stats']['align_ratio']:.1f}% |"
        )
    lines += [
        "",
        "A 1:1 segment gives an exact next-token signal over the shared vocabulary; SimCT also supervises every "
        "multi-token segment through its span column, so every student token before the last anchor receives a "
        "signal. GOLD's ULD compares every group too, but only through sorted probabilities (no token identity). "
        "tests/test_cross_tokenizer.py checks on a corpus of diverse texts (LaTeX, code, CJK, emoji, whitespace "
        "runs) that trl_opd's 1:1 share is at least GOLD's for every pair, and far above it where GOLD falls back "
        "to positional alignment (non-ByteLevel tokenizers such as Mistral's).",
        "",
    ]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pairs",
        nargs="+",
        default=["qwen3:llama3", "gpt2:pythia"],
        help="student:teacher directory names under --tokenizers (GOLD needs ByteLevel tokenizers)",
    )
    parser.add_argument("--tokenizers", type=Path, default=TOKENIZERS, help="folder of tokenizer folders")
    parser.add_argument("--tokens", type=int, default=4096, help="student tokens per rollout")
    parser.add_argument("--chunk", type=int, default=128, help="student tokens per loss piece")
    parser.add_argument("--repeats", type=int, default=5, help="runs of the alignment (median)")
    parser.add_argument("--loss-repeats", type=int, default=1, help="runs of each loss piece (median)")
    parser.add_argument(
        "--scaling",
        type=int,
        nargs="*",
        default=[32, 64, 128, 256],
        help="piece lengths for the single-piece loss scaling of the first pair (none: skip)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (shared machine)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the existing --output")
    args = parser.parse_args()
    if args.markdown_only:
        print(write_markdown(json.loads(args.output.read_text()), args.output.with_suffix(".md")))
        return
    torch.set_num_threads(args.threads)
    pairs = [bench_pair(*pair.split(":"), args, number == 0) for number, pair in enumerate(args.pairs)]
    report = {
        "what": "alignment + loss (forward+backward) per rollout: trl_opd SimCT vs TRL GOLD extended ULD",
        "tokens": args.tokens,
        "loss_chunk_tokens": args.chunk,
        "repeats": args.repeats,
        "loss_repeats": args.loss_repeats,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "note": "median wall seconds on a shared CPU and process CPU seconds; random logits at the real "
        "vocabulary sizes; setup_once_s (token tables, shared vocabulary) is paid once per tokenizer pair",
        "pairs": pairs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.output.with_suffix(".md"))
    for pair in pairs:
        ours, gold = pair["trl_opd"], pair["trl_gold"]
        print(
            f"{pair['student']} -> {pair['teacher']}: trl_opd {ours['total_simct']['wall_s']:.2f}s "
            f"(align {ours['align']['wall_s'] * 1e3:.1f} ms), GOLD {gold['total']['wall_s']:.2f}s "
            f"(align {gold['align']['wall_s'] * 1e3:.1f} ms); speedup {pair['speedup_total']['wall_s']:.1f}x"
        )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
