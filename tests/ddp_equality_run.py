"""A short OPDTrainer run with TIP (`weighted_mean`, normalised by the tokens selected on every process), used by
`tests/test_distributed.py` twice: under `accelerate launch --multi_gpu --num_processes 2` with 2 rows per process,
and in the test's own process with 4 rows: the same global batch. Not a test module itself.

Dataset completions (`lmbda=0`) make the rollouts deterministic and ragged (so the processes select different
numbers of tokens). `tip_divergence_only` ranks tokens within each row by their own divergence, so a row's selection
does not depend on which other rows share its micro-batch (`tip_soft_or` normalises entropy and divergence over the
micro-batch on each process, so its selection legitimately changes with the process layout).
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import cpu_args, prompt_dataset, tiny_model, tiny_tokenizer  # noqa: E402
from trl_opd import OPDConfig, OPDTrainer  # noqa: E402

GLOBAL_BATCH = 4
ROWS = [0, 13, 2, 38, 5, 21, 9, 30]  # short and long prompts/completions mixed


def run(output_dir: str, per_device_train_batch_size: int) -> dict:
    tokenizer = tiny_tokenizer()
    args = OPDConfig(
        output_dir=output_dir, token_selection="tip_divergence_only", token_ratio=0.5, loss_reduction="weighted_mean",
        lmbda=0.0, **cpu_args(max_steps=2, per_device_train_batch_size=per_device_train_batch_size,
                              max_completion_length=24),
    )
    trainer = OPDTrainer(tiny_model(tokenizer, seed=0), tiny_model(tokenizer, hidden=48, seed=1), args=args,
                         train_dataset=prompt_dataset(40).select(ROWS), processing_class=tokenizer)
    assert trainer.accelerator.num_processes * per_device_train_batch_size == GLOBAL_BATCH
    trainer.train()
    history = trainer.state.log_history
    return {
        "num_processes": trainer.accelerator.num_processes,
        "losses": [entry["loss"] for entry in history if "loss" in entry],
        "selected_ratio": [entry["selected_ratio"] for entry in history if "selected_ratio" in entry],
        "weights": {name: p.detach().cpu().tolist() for name, p in trainer.accelerator.unwrap_model(
            trainer.model).named_parameters()},
        "trainer": trainer,
    }


if __name__ == "__main__":
    out = Path(sys.argv[1])
    result = run(str(out.parent / "two-processes"), per_device_train_batch_size=GLOBAL_BATCH // 2)
    if result.pop("trainer").accelerator.is_main_process:
        out.write_text(json.dumps(result))
    torch.distributed.barrier()
