"""Launched by `tests/test_distributed.py` under `accelerate launch --multi_gpu --num_processes 2`; not a test module.

OPDTrainer on tiny models where only rank 1's teacher is corrupted (NaN final-norm weights, so NaN hidden states).
Rank 1 raises FloatingPointError at its first step; rank 0, which saw finite values, waits in DDP's gradient
all-reduce until the launcher ends it. The test checks that the launch fails promptly with rank 1's message rather
than hanging until the collective's timeout (30 minutes by default).
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import cpu_args, end_distributed_run, prompt_dataset, tiny_model, tiny_tokenizer  # noqa: E402
from trl_opd import OPDConfig, OPDTrainer  # noqa: E402


def main(output_dir: str) -> None:
    tokenizer = tiny_tokenizer()
    teacher = tiny_model(tokenizer, hidden=48, seed=1)
    if os.environ["RANK"] == "1":  # set by torchrun before the script starts
        with torch.no_grad():
            teacher.model.norm.weight.fill_(float("nan"))
    args = OPDConfig(output_dir=output_dir, lmbda=0.0, **cpu_args(max_steps=3, per_device_train_batch_size=2,
                                                                  max_completion_length=24))
    trainer = OPDTrainer(tiny_model(tokenizer, seed=0), teacher, args=args, train_dataset=prompt_dataset(8),
                         processing_class=tokenizer)
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1])
    end_distributed_run()
