"""A 2-process launch that accelerate runs as 2 lone processes (no `use_cpu` on a CPU-only machine): each trainer
must refuse it before training; with `use_cpu=True` the same launch joins the processes and trains. Used by
tests/test_distributed.py (not a test module itself).

    accelerate launch --multi_gpu --num_processes 2 tests/lone_process_run.py opd|rlad OUT.json USE_CPU
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import cpu_args, end_distributed_run, length_reward, prompt_dataset, tiny_model, tiny_tokenizer  # noqa: E402

from trl_opd import OPDConfig, OPDTrainer, RLADConfig, RLADTrainer  # noqa: E402


def build(kind: str, out: Path, use_cpu: bool):
    tokenizer = tiny_tokenizer()
    settings = cpu_args(use_cpu=use_cpu, max_steps=1, per_device_train_batch_size=2, output_dir=str(out.parent / kind))
    student, teacher = tiny_model(tokenizer, seed=0), tiny_model(tokenizer, seed=1)
    if kind == "opd":
        return OPDTrainer(student, teacher, args=OPDConfig(lmbda=0.0, **settings), train_dataset=prompt_dataset(8),
                          processing_class=tokenizer)
    return RLADTrainer(student, length_reward, args=RLADConfig(num_generations=2, **settings),
                       train_dataset=prompt_dataset(8), processing_class=tokenizer, teacher_model=teacher)


def main(kind: str, out: str, use_cpu: str) -> None:
    out = Path(out)
    try:
        trainer = build(kind, out, use_cpu == "1")
    except RuntimeError as error:
        result = {"refused": str(error)}
    else:
        trainer.train()
        result = {"processes": trainer.accelerator.num_processes}
    rank = os.environ.get("RANK", "0")
    out.with_name(f"{out.stem}-rank{rank}.json").write_text(json.dumps(result))
    if use_cpu == "1":
        end_distributed_run()


if __name__ == "__main__":
    main(*sys.argv[1:])
