"""Loss-phase peak memory and time of TIP token selection (ρ = 0.5) against all tokens, through OPDTrainer (CPU).

What is measured: one `OPDTrainer.compute_loss` + `backward()` on a synthetic batch of completion tokens, with
student and teacher of the Qwen3 vocabulary (151,936 entries) and a 1-layer, width-64 backbone, so that the
output layer and the loss dominate, as they do at this vocabulary. The trainer's own code path runs: backbones,
the no-grad TIP scoring pass (chunked), the selection, the fused loss on the selected rows only, the backward.
Every variant runs in a fresh subprocess; its loss-phase footprint is its peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``) minus its RSS just before `compute_loss`.

The loss is chunked: a chunk holds at most `loss_chunk_size` tokens, and at this vocabulary fewer, so that one
chunk's logits are no more than TRL's vocabulary tile for the same batch (`objective.ChunkPolicy.loss_tokens`: about
0.22 × the token count at 151,936 entries). TIP's scoring pass runs in chunks of ⌈ρ·c⌉ tokens, c being the
all-token chunk, and its gradient pass holds the ≈ρ·N selected rows in chunks of about ρ·c; so both of its passes
hold about ρ times the logits of the all-token loss, whatever the token count. Measured at the default
`loss_chunk_size` (1,024) for 4,096, 2,048 and 1,024 completion tokens.

    python bench/bench_tip_memory.py          # writes bench/results/tip_memory_cpu.json and .md
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

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 151_936
HIDDEN = 64
RATIO = 0.5
# (tokens in the batch, loss_chunk_size): the default chunk size at three token counts.
CONFIGURATIONS = ((4096, 1024), (2048, 1024), (1024, 1024))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def current_rss_gb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**3


def tiny_qwen3(seed: int, pad_id: int, eos_id: int):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HIDDEN // 4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    return Qwen3ForCausalLM(config)


def build_trainer(selection: str, chunk_size: int, output_dir: str):
    from datasets import Dataset

    from trl_opd import OPDConfig, OPDTrainer
    from trl_opd.testbed.tokenizers import char_tokenizer

    tokenizer = char_tokenizer()
    args = OPDConfig(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        report_to="none",
        gradient_checkpointing=False,
        divergence="reverse_kl",
        loss_chunk_size=chunk_size,
        token_selection=selection,
        token_ratio=RATIO,
        loss_reduction="weighted_mean" if selection != "none" else "token_mean",
        disable_tqdm=True,
    )
    return OPDTrainer(
        tiny_qwen3(0, tokenizer.pad_token_id, tokenizer.eos_token_id),
        tiny_qwen3(1, tokenizer.pad_token_id, tokenizer.eos_token_id),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["x"] * 8}),  # one batch: the loss reads synthetic batches
        processing_class=tokenizer,
    )


def synthetic_batch(tokens: int, rows: int = 4) -> dict:
    """`rows` sequences of tokens/rows random completion tokens after an 8-token prompt (what generation returns)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    width = tokens // rows
    completion_mask = torch.ones(rows, width, dtype=torch.long)
    return {
        "prompt_ids": torch.randint(0, VOCAB, (rows, 8), generator=generator),
        "prompt_mask": torch.ones(rows, 8, dtype=torch.long),
        "completion_ids": torch.randint(0, VOCAB, (rows, width), generator=generator),
        "completion_mask": completion_mask,
        "num_items_in_batch": completion_mask.sum(),
        "num_sequences_in_batch": torch.tensor(rows),
    }


def child(selection: str, tokens: int, chunk_size: int) -> dict:
    """One measurement (runs in its own process)."""
    import tempfile

    import torch

    from trl_opd import objective as objective_module

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(selection, chunk_size, output_dir)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        batch = synthetic_batch(tokens)
        rows_in_gradient_pass = []
        original = objective_module.fused_divergence_loss

        def counting(student_hidden, *args, **kwargs):  # the gradient pass of the objective's token term
            rows_in_gradient_pass.append(student_hidden.shape[0])
            return original(student_hidden, *args, **kwargs)

        objective_module.fused_divergence_loss = counting
        chunks, vocab = trainer.objective.chunks, trainer.model.get_output_embeddings().weight.shape[0]
        before, high_water_before = current_rss_gb(), peak_rss_gb()
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        peak = peak_rss_gb()
    return {
        "selection": selection,
        "tokens": tokens,
        "loss_chunk_size": chunk_size,
        "scoring_chunk_size": chunks.scoring_tokens(tokens, vocab) if selection != "none" else None,
        "rows_in_gradient_pass": rows_in_gradient_pass[0],
        "chunk_tokens": chunks.loss_tokens(tokens, vocab),
        "loss": loss.item(),
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "rss_before_gb": round(before, 3),
        "peak_rss_gb": round(peak, 3),
        "loss_phase_peak_gb": round(peak - before, 3),
        "high_water_before_gb": round(high_water_before, 3),
        "peak_is_from_loss_phase": peak > high_water_before,
    }


def measure(selection: str, tokens: int, chunk_size: int) -> dict:
    command = [sys.executable, __file__, "--child", selection, str(tokens), str(chunk_size)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRL_EXPERIMENTAL_SILENCE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    finished = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def markdown(record: dict) -> str:
    lines = [
        "# TIP (ρ = 0.5) vs all tokens: loss-phase peak memory through OPDTrainer (CPU)",
        "",
        f"`{record['command']}` on {record['hardware']}. Vocabulary {VOCAB:,}, 1-layer width-{HIDDEN} backbones, "
        "4 sequences, reverse KL; TIP = Soft-OR with `weighted_mean`. Footprint = peak RSS − RSS before "
        "`compute_loss` (one forward + backward, fresh process per variant); time = CPU seconds of that process (one "
        "thread; wall time on this shared machine is noise).",
        "",
        "| tokens | loss_chunk_size | chunk used (all / TIP scoring) | all tokens: GB / CPU s "
        "| TIP ρ=0.5: GB / CPU s (rows in gradient pass) "
        "| memory ratio | CPU time ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for pair in record["pairs"]:
        full, tip = pair["all"], pair["tip"]
        lines.append(
            f"| {full['tokens']:,} | {full['loss_chunk_size']} | {full['chunk_tokens']} / {tip['scoring_chunk_size']} | {full['loss_phase_peak_gb']:.2f} / "
            f"{full['cpu_seconds']:.1f} | {tip['loss_phase_peak_gb']:.2f} / {tip['cpu_seconds']:.1f} "
            f"({tip['rows_in_gradient_pass']:,} of {full['rows_in_gradient_pass']:,}) | "
            f"{pair['memory_ratio']:.2f}× | {pair['time_ratio']:.2f}× |"
        )
    return "\n".join(lines) + "\n\n" + record["reading"] + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", nargs=3, metavar=("SELECTION", "TOKENS", "CHUNK"), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child:
        selection, tokens, chunk_size = options.child
        print(json.dumps(child(selection, int(tokens), int(chunk_size))))
        return 0

    import torch

    pairs = []
    for tokens, chunk_size in CONFIGURATIONS:
        full, tip = measure("none", tokens, chunk_size), measure("tip_soft_or", tokens, chunk_size)
        pairs.append(
            {
                "all": full,
                "tip": tip,
                "memory_ratio": tip["loss_phase_peak_gb"] / full["loss_phase_peak_gb"],
                "time_ratio": tip["cpu_seconds"] / full["cpu_seconds"],
            }
        )
    memory = [p["memory_ratio"] for p in pairs]
    times = [p["time_ratio"] for p in pairs]
    reading = (
        f"Reading: TIP at ρ = 0.5 needs {min(memory):.2f}–{max(memory):.2f}× the all-token loss-phase memory "
        "(target ≤ 0.55× at 4,096 tokens): only the selected rows enter the LM head with gradients, and the no-grad "
        "scoring pass runs in chunks of ⌈ρ·c⌉ tokens, c the all-token loss's chunk. Compute: TIP pays a no-grad "
        "scoring pass over every token (both LM heads, both softmaxes, entropy and divergence) and saves the "
        f"gradient pass on half of them; its loss phase takes {min(times):.2f}–{max(times):.2f}× the all-token CPU "
        "time here, so on a CPU the selection buys memory, not speed."
    )
    record = {
        "command": "python bench/bench_tip_memory.py",
        "hardware": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}) shared with other "
        f"jobs, torch {torch.__version__}, 1 thread",
        "vocab": VOCAB,
        "hidden": HIDDEN,
        "ratio": RATIO,
        "pairs": pairs,
        "reading": reading,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tip_memory_cpu.json").write_text(json.dumps(record, indent=2))
    (RESULTS / "tip_memory_cpu.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
