"""One-seed diagnosis runs of OPD + mu * OPRD with the same-backbone toy teacher (bench/results/oprd_combined_diagnosis.md).

The settings of `bench_oprd.py testbed` (multistrategy, batch 32, lr constant, clip 1.0, all layers, all positions,
distillation seed 0), logging every 20 steps, accuracy on the first 100 held-out problems:

    python bench/oprd_combined_diagnosis.py MU LOGIT_WEIGHT LR STEPS ['{"OPDConfig field": value, ...}']
    python bench/oprd_combined_diagnosis.py 1 1 1e-3 300 '{"representation_layers": "1"}'
    python bench/oprd_combined_diagnosis.py 1 1 1e-3 300 '{"freeze_embeddings": true}'   # tied head frozen too
"""

import json
import sys
import time

import torch
from bench_oprd import same_backbone_teacher  # the script's folder is on sys.path

from trl_opd import OPDConfig, OPDTrainer, testbed


def main() -> None:
    torch.set_num_threads(1)
    mu, logit_weight, learning_rate, steps = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    extra = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    freeze = extra.pop("freeze_embeddings", False)
    prepared = testbed.prepare("multistrategy", seed=0)
    teacher, tokenizer = testbed.load_pretrained(same_backbone_teacher("multistrategy"))
    student, _ = testbed.load_pretrained(prepared["student"])
    student.train()
    if freeze:
        student.get_input_embeddings().weight.requires_grad_(False)
    data = testbed.make_dataset(steps * 32, prepared["task"], seed=0)
    args = OPDConfig(
        output_dir="/tmp/oprd_combined_diagnosis", max_steps=steps, per_device_train_batch_size=32,
        learning_rate=learning_rate, lr_scheduler_type="constant", max_grad_norm=1.0, temperature=1.0,
        max_completion_length=40, seed=0, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
        save_strategy="no", logging_steps=20, disable_tqdm=True,
        **{"representation_layers": "all", "representation_positions": "all", "representation_weight": mu,
           "logit_weight": logit_weight, **extra},
    )
    trainer = OPDTrainer(student, teacher, args=args, train_dataset=data, processing_class=tokenizer)
    start = time.time()
    trainer.train()
    for entry in trainer.state.log_history:
        if "opd/divergence" in entry or "oprd/loss" in entry:
            print({key: entry.get(key) for key in ("step", "opd/divergence", "oprd/loss", "entropy", "grad_norm")})
    accuracy = testbed.accuracy(trainer.model, tokenizer, testbed.heldout_problems(prepared["task"])[:100])
    print(f"accuracy {accuracy:.2f} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
