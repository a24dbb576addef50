"""Loss-phase speed and peak memory of the chunked loss kernels (CPU): trl_opd (a) checkpointed chunks,
(b) fused linear + divergence, and TRL's ``ChunkedDivergenceFunction``; optionally the dense full-logit path.

One forward + backward of the per-token reverse KL from hidden states and LM heads (N tokens, hidden d,
vocabulary V; DESIGN.md "Performance notes" uses N=1024, d=256, V=151,936). Every variant runs in a fresh
subprocess, so its peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own; the
baseline RSS after building the inputs is reported too, and ``peak_minus_baseline_gb`` is the loss's own
footprint. A measurement, not a test.

    python bench/bench_loss_kernels.py                         # writes bench/results/loss_kernels_cpu.json
    python bench/bench_loss_kernels.py --tokens 256 --dense    # smaller, with the dense reference
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("trl_opd_chunked", "trl_opd_fused", "trl_chunked_divergence")
RESULTS = Path(__file__).parent / "results" / "loss_kernels_cpu.json"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def current_rss_gb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**3


def make_inputs(tokens: int, hidden: int, vocab: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    scale = hidden**-0.5
    return {
        "student_hidden": torch.randn(tokens, hidden, generator=generator).requires_grad_(True),
        "student_head": (scale * torch.randn(vocab, hidden, generator=generator)).requires_grad_(True),
        "teacher_hidden": torch.randn(tokens, hidden, generator=generator),
        "teacher_head": scale * torch.randn(vocab, hidden, generator=generator),
    }


def run_variant(variant: str, inputs: dict, chunk_size: int) -> torch.Tensor:
    """One forward + backward of the token-mean reverse KL; returns the loss."""
    from trl_opd import losses  # imported (and timed) once by `child` before the measurement

    tokens = inputs["student_hidden"].shape[0]
    if variant == "trl_opd_chunked":
        per_token = losses.chunked_token_divergence(**inputs, divergence="reverse_kl", chunk_size=chunk_size)
        loss = per_token.mean()
    elif variant == "trl_opd_fused":
        coefficients = torch.full((tokens,), 1.0 / tokens)
        loss, _, _ = losses.fused_divergence_loss(
            **inputs, coefficients=coefficients, divergence="reverse_kl", chunk_size=chunk_size
        )
    elif variant == "trl_chunked_divergence":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        per_token, _ = ChunkedDivergenceFunction.apply(
            inputs["student_hidden"],
            inputs["student_head"],
            None,
            inputs["teacher_hidden"],
            inputs["teacher_head"],
            None,
            1.0,
        )
        loss = per_token.mean()
    elif variant == "dense":
        student_logits = inputs["student_hidden"] @ inputs["student_head"].T
        with torch.no_grad():
            teacher_logits = inputs["teacher_hidden"] @ inputs["teacher_head"].T
        loss = losses.per_token_divergence(student_logits, teacher_logits, divergence="reverse_kl").mean()
    else:
        raise ValueError(f"Unknown variant {variant!r}; choose from {VARIANTS + ('dense',)}.")
    loss.backward()
    return loss.detach()


def child(args) -> None:
    """Measure one variant in this (fresh) process and print one JSON line."""
    import trl.kernels.chunked_divergence  # noqa: F401  (imports out of the timed region)

    import trl_opd.losses  # noqa: F401

    # Warm-up on a tiny problem (lazy initialisation), far below the measured peak.
    run_variant(args.variant, make_inputs(8, args.hidden, 4096, seed=1), max(args.chunk_size, 1))
    inputs = make_inputs(args.tokens, args.hidden, args.vocab)
    baseline = current_rss_gb()
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = run_variant(args.variant, inputs, args.chunk_size)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = peak_rss_gb()
    grad_norm = inputs["student_head"].grad.norm().item()
    print(
        json.dumps(
            {
                "variant": args.variant,
                "chunk_size": args.chunk_size if args.variant.startswith("trl_opd") else None,
                "seconds": round(seconds, 2),
                "cpu_seconds": round(cpu_seconds, 2),
                "peak_rss_gb": round(peak, 3),
                "baseline_rss_gb": round(baseline, 3),
                "peak_minus_baseline_gb": round(peak - baseline, 3),
                "loss": loss.item(),
                "student_head_grad_norm": grad_norm,
            }
        )
    )


def parent(args) -> None:
    variants = list(VARIANTS) + (["dense"] if args.dense else [])
    rows = []
    for variant in variants:
        for chunk_size in args.chunk_sizes if variant.startswith("trl_opd") else [None]:
            command = [
                sys.executable,
                __file__,
                "--child",
                "--variant",
                variant,
                "--tokens",
                str(args.tokens),
                "--hidden",
                str(args.hidden),
                "--vocab",
                str(args.vocab),
                "--chunk-size",
                str(chunk_size or 0),
            ]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    report = {
        "what": "loss phase forward+backward, reverse KL, token mean, from hidden states x LM head",
        "tokens": args.tokens,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "note": "seconds = wall time on a shared CPU (other jobs running); cpu_seconds = user+sys CPU time of "
        "the process (less sensitive to sharing); peak = ru_maxrss of a fresh subprocess per variant",
        "results": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--dense", action="store_true", help="also run the dense full-logit reference")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
