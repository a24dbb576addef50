"""Cost of OPDTrainer's diagnostics pass (`diagnostics_steps`) next to the loss it rides along with.

The loss phase of one micro-batch (fused reverse-KL loss, forward + backward) and the diagnostics pass
(`OPDObjective.diagnose`: overlap_stats, TIP quadrant shares) on the same random hidden states and LM
heads, at a real vocabulary size. Only these two phases are timed: generation and the model forwards, which
dominate a real step, are left out, so the ratio is an upper bound on the overhead of a step where it is due.

    OMP_NUM_THREADS=1 python bench/bench_diagnostics.py --tokens 1024 --vocab 151936 --hidden 256
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from trl_opd.losses import OutputHead, fused_divergence_loss
from trl_opd.objective import ChunkPolicy, CompletionBatch, Diagnostics, LocalTeacher, OPDObjective


def best_of(repeats: int, function) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default=None, help="JSON file for the measured numbers")
    args = parser.parse_args()
    torch.manual_seed(0)
    student_weight = (torch.randn(args.vocab, args.hidden) * 0.05).requires_grad_()
    teacher_weight = torch.randn(args.vocab, args.hidden) * 0.05
    student_hidden = torch.randn(args.tokens, args.hidden, requires_grad=True)
    teacher_hidden = torch.randn(args.tokens, args.hidden)
    coefficients = torch.full((args.tokens,), 1.0 / args.tokens)
    objective = OPDObjective(chunks=ChunkPolicy(loss_chunk_size=args.chunk_size), diagnostics=Diagnostics(args.top_k))
    batch = CompletionBatch(
        valid=torch.ones(1, args.tokens, dtype=torch.bool),
        completion_ids=torch.zeros(1, args.tokens, dtype=torch.long),
        student_hidden=student_hidden.detach()[None],
        student_head=OutputHead(student_weight.detach()),
        teacher=LocalTeacher(teacher_hidden[None], OutputHead(teacher_weight)),
    )

    def loss_step():
        loss, _, _ = fused_divergence_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                           coefficients, chunk_size=args.chunk_size)
        loss.backward()

    def diagnostics():
        objective.diagnose(batch)

    loss_seconds = best_of(args.repeats, loss_step)
    diagnostics_seconds = best_of(args.repeats, diagnostics)
    result = {
        "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden, "chunk_size": args.chunk_size,
        "top_k": args.top_k, "threads": torch.get_num_threads(),
        "loss_forward_backward_s": round(loss_seconds, 3), "diagnostics_s": round(diagnostics_seconds, 3),
        "ratio": round(diagnostics_seconds / loss_seconds, 3),
        "logged": {name: round((total / count).item(), 5) for name, (total, count) in objective.diagnose(batch).items()},
    }
    print(json.dumps(result, indent=1))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
