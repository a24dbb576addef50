"""Launched by `tests/test_tip.py` under `accelerate launch --multi_gpu --num_processes 2`
(torchrun on CPU: `use_cpu=True` gives gloo); not a test module itself.

A short TIP run (`weighted_mean`) on tiny models. Every process records, at each micro-step, the sum of its loss
coefficients and the number of tokens it selected; rank 0 writes both processes' records and the logged losses to
the JSON file named on the command line.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import cpu_args, end_distributed_run, prompt_dataset, tiny_model, tiny_tokenizer  # noqa: E402
from trl_opd import OPDConfig, OPDTrainer  # noqa: E402


class RecordingTrainer(OPDTrainer):
    records: list

    def _mean_over_processes(self, local):
        """`weighted_mean` asks for the normaliser of its local Σ w·m (the selected tokens: TIP's weights are 0/1);
        its coefficients w·m / normaliser then sum to local / normaliser."""
        normaliser = super()._mean_over_processes(local)
        self.records.append([(local / normaliser).item(), local.item()])
        return normaliser


def main(output_path: str) -> None:
    tokenizer = tiny_tokenizer()
    data = prompt_dataset(40).select([0, 13, 2, 38, 5, 21, 9, 30])  # ragged: processes select different counts
    args = OPDConfig(output_dir=str(Path(output_path).parent / "run"), token_selection="tip_soft_or", token_ratio=0.5,
                     loss_reduction="weighted_mean", lmbda=0.0,  # dataset completions: ragged, reproducible
                     **cpu_args(max_steps=2, per_device_train_batch_size=2, max_completion_length=24))
    trainer = RecordingTrainer(tiny_model(tokenizer, seed=0), tiny_model(tokenizer, hidden=48, seed=1), args=args,
                               train_dataset=data, processing_class=tokenizer)
    trainer.records = []
    trainer.train()
    records = trainer.accelerator.gather(torch.tensor(trainer.records).unsqueeze(0)).tolist()
    if trainer.accelerator.is_main_process:
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        result = {"num_processes": trainer.accelerator.num_processes, "records": records, "losses": losses,
                  "selected_ratio": [e["opd/selected_share"] for e in trainer.state.log_history if "opd/selected_share" in e]}
        Path(output_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
    end_distributed_run()
