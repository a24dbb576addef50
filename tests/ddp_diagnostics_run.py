"""Launched by `tests/test_opd_diagnostics.py` under `accelerate launch --multi_gpu --num_processes 2`
(torchrun on CPU: `use_cpu=True` gives gloo); not a test module itself.

Each rank scores its own 4 ragged rows (evaluation mode, `diagnostics_steps=1`), so the ranks hold different
numbers of tokens. Every rank also computes `overlap_stats` by brute force over the 8 rows of both ranks (the models
are built identically on both ranks); rank 0 writes both ranks' logged values and that reference to the JSON file
named on the command line.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import cpu_args, end_distributed_run, prompt_dataset, tiny_model, tiny_tokenizer  # noqa: E402
from trl_opd import OPDConfig, OPDTrainer  # noqa: E402
from trl_opd.diagnostics import OVERLAP_KEYS, overlap_stats  # noqa: E402


def completion_logits(model, batch, row):
    prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()]
    completion = batch["completion_ids"][row][batch["completion_mask"][row].bool()]
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt, completion]).unsqueeze(0)).logits[0]
    return logits[len(prompt) - 1: len(prompt) - 1 + len(completion)].double()


def main(output_path: str) -> None:
    tokenizer = tiny_tokenizer()
    data = prompt_dataset(40).select([0, 13, 2, 38, 5, 21, 9, 30])  # ragged: the ranks hold different token counts
    args = OPDConfig(output_dir=str(Path(output_path).parent / "run"), lmbda=0.0, diagnostics_steps=1,
                     diagnostics_top_k=4, **cpu_args(per_device_train_batch_size=4, max_completion_length=24))
    trainer = OPDTrainer(tiny_model(tokenizer, seed=0), tiny_model(tokenizer, hidden=48, seed=1), args=args,
                         train_dataset=data, processing_class=tokenizer)
    rank = trainer.accelerator.process_index
    # Generated in training mode, where lmbda=0 reads the dataset's completions: the same batches on both ranks.
    batches = [trainer._generate_and_score_completions([data[i] for i in range(4 * r, 4 * r + 4)]) for r in (0, 1)]
    trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batches[rank])
    logged = {key: trainer._metrics["eval"][f"diagnostics/{key}"] for key in OVERLAP_KEYS}
    student = trainer.accelerator.unwrap_model(trainer.model)
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    rows = [(batch, row) for batch in batches for row in range(4)]
    student_logits = torch.cat([completion_logits(student, batch, row) for batch, row in rows])
    teacher_logits = torch.cat([completion_logits(teacher, batch, row) for batch, row in rows])
    union = overlap_stats(student_logits[None], teacher_logits[None], torch.ones(1, len(student_logits)), k=4)
    local_tokens = int(batches[rank]["completion_mask"].sum())
    everything = trainer.accelerator.gather_for_metrics([{"logged": logged, "local_tokens": local_tokens}])
    if trainer.accelerator.is_main_process:
        result = {"num_processes": trainer.accelerator.num_processes, "ranks": everything, "union": union}
        Path(output_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
    end_distributed_run()
