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

from tiny import cpu_args, end_distributed_run, prompt_dataset, tiny_model, tiny_tokenizer  # noqa: E402
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
        "selected_ratio": [entry["opd/selected_share"] for entry in history if "opd/selected_share" in entry],
        "weights": {name: p.detach().cpu().tolist() for name, p in trainer.accelerator.unwrap_model(
            trainer.model).named_parameters()},
        "trainer": trainer,
    }


def on_policy_smoke(output_dir: str) -> dict:
    """2 steps of on-policy OPDTrainer (sampling, OPRD projector, TIP soft-OR) and of SimCTTrainer under the same
    launch: finite losses, the same on every process (the launch that checks equality pays for these too)."""
    from trl_opd import SimCTConfig, SimCTTrainer
    from trl_opd.testbed.models import tiny_model as char_level_model
    from trl_opd.testbed.tokenizers import char_tokenizer

    tokenizer = tiny_tokenizer()
    settings = cpu_args(max_steps=2, per_device_train_batch_size=2, max_completion_length=8)
    opd = OPDTrainer(tiny_model(tokenizer, seed=0), tiny_model(tokenizer, hidden=48, layers=3, seed=1),
                     args=OPDConfig(output_dir=output_dir + "/opd", token_selection="tip_soft_or",
                                    representation_weight=1.0, **settings),
                     train_dataset=prompt_dataset(), processing_class=tokenizer)
    teacher_tokenizer = char_tokenizer()
    simct = SimCTTrainer(tiny_model(tokenizer, seed=0),
                         char_level_model(teacher_tokenizer, hidden=32, layers=1, heads=2, seed=1),
                         args=SimCTConfig(output_dir=output_dir + "/simct", **settings), train_dataset=prompt_dataset(),
                         processing_class=tokenizer, teacher_processing_class=teacher_tokenizer)
    losses = {}
    for name, trainer in (("opd", opd), ("simct", simct)):
        trainer.train()
        losses[name] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses


if __name__ == "__main__":
    out = Path(sys.argv[1])
    result = run(str(out.parent / "two-processes"), per_device_train_batch_size=GLOBAL_BATCH // 2)
    trainer = result.pop("trainer")
    result["on_policy_losses"] = on_policy_smoke(str(out.parent / "smoke"))
    gathered = [None] * trainer.accelerator.num_processes
    torch.distributed.all_gather_object(gathered, result["on_policy_losses"])
    result["on_policy_losses_per_process"] = gathered
    if trainer.accelerator.is_main_process:
        out.write_text(json.dumps(result))
    end_distributed_run()
