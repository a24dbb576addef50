"""Which sharding engines the trainers' LM-head passes run under, decided before any weights load.

* DDP: tested (tests/test_distributed.py).
* FSDP2: the heads are read through `lm_head.output_head`, which gathers a sharded (DTensor) head whole once per
  micro-batch; the objective's passes under `fully_shard` and the three trainers on accelerate's FSDP2 path are
  tested on 2 CPU processes (tests/test_fsdp2.py).
* Any engine: a launch whose processes would each train alone is refused (`check_launch`).
* DeepSpeed ZeRO-3: refused for OPDTrainer and SimCTTrainer. ZeRO-3 partitions every weight and gathers a module's
  weights only around that module's own forward; the chunked loss, TIP's scoring pass, the diagnostics and the
  sampled-token log-probs read `lm_head.weight` outside the head's forward, where ZeRO-3 leaves an empty partition.
  DeepSpeed does not run on this project's CPU test machines, so a gathering path could not be tested; ZeRO-2
  (optimizer and gradients sharded, weights whole) runs them as they are. RLADTrainer scores with TRL's own GRPO
  kernels and is not refused here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def deepspeed_zero_stage(args) -> int | None:
    """The ZeRO stage this run will use: from `args.deepspeed` (a dict or a JSON file) or from `accelerate launch`'s
    environment (`ACCELERATE_DEEPSPEED_ZERO_STAGE`, `ACCELERATE_DEEPSPEED_CONFIG_FILE`); None without DeepSpeed."""
    config = getattr(args, "deepspeed", None)
    if config is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if stage not in (None, "", "auto"):
            return int(stage)
        config = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if isinstance(config, (str, os.PathLike)) and Path(config).is_file():
        config = json.loads(Path(config).read_text())
    if isinstance(config, dict):
        stage = config.get("zero_optimization", {}).get("stage")
        return int(stage) if isinstance(stage, int) or (isinstance(stage, str) and stage.isdigit()) else None
    return None


def check_engine(args, trainer_name: str) -> None:
    """Refuse DeepSpeed ZeRO-3 for the trainers whose passes read the LM heads directly (see the module docstring)."""
    if deepspeed_zero_stage(args) == 3:
        raise ValueError(
            f"{trainer_name} does not run under DeepSpeed ZeRO-3: ZeRO-3 partitions the LM heads, which {trainer_name}'s "
            "chunked loss, TIP scoring, diagnostics and sampled-token passes read outside the head's forward (they "
            "would see empty partitions). Use ZeRO-2 (`--accelerate_config zero2`: optimizer states and gradients "
            "sharded, weights whole) or FSDP2 (`--accelerate_config fsdp2`). docs/reliability.md says what is tested."
        )


def check_launch(args, trainer_name: str) -> None:
    """Refuse a launch whose processes would each train alone.

    `accelerate launch` starts WORLD_SIZE processes, and accelerate joins them into one run only when it finds their
    device type: GPUs (or other accelerators), or CPUs with `use_cpu` (gloo). Otherwise each process comes up
    non-distributed as its own main process (measured: TRL's `fsdp2.yaml` and `multi_gpu.yaml` on a CPU-only
    machine), and each would train the whole run on the whole dataset and write the same `output_dir` (and Hub
    repository). `args.world_size` is the Trainer's own device setup, so this asks exactly what the run would do.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size == 1:
        raise RuntimeError(
            f"{trainer_name}: {launched} processes were launched, but accelerate runs each of them alone (no process "
            "group): each would train the whole run and write the same output_dir. accelerate found no device to "
            "join them on: check that the GPUs are visible (CUDA_VISIBLE_DEVICES, `nvidia-smi`). On a CPU-only "
            "machine only DDP joins processes: `--multi_gpu` with `use_cpu: true` in the training config (`--use_cpu`) "
            "or ACCELERATE_USE_CPU=true; FSDP2 and DeepSpeed need accelerator devices."
        )

