"""Which sharding engines the trainers run under, and the launches they refuse, decided before any weights load.

* DDP: tested (tests/test_distributed.py).
* FSDP2: the heads are read through `lm_head.output_head`, which gathers a sharded (DTensor) head whole once per
  micro-batch; the objective's passes under `fully_shard` and the three trainers on accelerate's FSDP2 path are
  tested on 2 CPU processes (tests/test_fsdp2.py).
* DeepSpeed ZeRO-2 and ZeRO-3: the trained student's head is whole inside its forward (`lm_head`); the teacher's
  is gathered once per micro-batch; the three trainers are tested on 2 CPU processes (tests/test_deepspeed.py).
* Any engine: a launch whose processes would each train alone is refused (`check_launch`).
"""

from __future__ import annotations

import os

from accelerate.utils import DistributedType


def check_launch(args, trainer_name: str) -> None:
    """Refuse a launch whose processes would each train alone.

    `accelerate launch` starts WORLD_SIZE processes; accelerate joins them into one run only when it finds their
    device type: GPUs (or other accelerators), or CPUs with `use_cpu` (gloo, DDP) or with `ddp_backend="gloo"`
    (DeepSpeed). Measured on a CPU-only machine: with TRL's `multi_gpu.yaml` or `fsdp2.yaml` each process comes up
    non-distributed as its own main process; with `fsdp2.yaml` and `ddp_backend="gloo"` they join (2 processes) but
    nothing wraps the model, so their gradients are never averaged. Either way each process trains its own model into
    the same `output_dir` (and Hub repository). `args.distributed_state` is the Trainer's own device setup, so this
    asks exactly what the run would do.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched == 1:
        return
    state = args.distributed_state
    if args.world_size == 1 or state.distributed_type == DistributedType.NO:
        raise RuntimeError(
            f"{trainer_name}: {launched} processes were launched, but accelerate runs each of them alone "
            f"({state.distributed_type.name}, {args.world_size} process(es) joined): each would train its own model "
            "into the same output_dir. accelerate found no device to join them on: check that the GPUs are visible "
            "(CUDA_VISIBLE_DEVICES, `nvidia-smi`). On a CPU-only machine: DDP with `--multi_gpu` and `use_cpu: true` "
            "(`--use_cpu`), or DeepSpeed with `--use_deepspeed`, `use_cpu: false` and `ddp_backend: gloo`; FSDP2 "
            "needs accelerator devices."
        )
