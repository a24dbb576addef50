"""DeepSpeed ZeRO-2 and ZeRO-3 (issue 17 item 2) on 2 CPU processes, against one process on the same global batch.

DeepSpeed runs on these CPUs through `accelerate launch --use_deepspeed` when the training config turns `use_cpu` off
(it would silently replace DeepSpeed by DDP) and names the gloo backend (`ddp_backend="gloo"`: accelerate names none
without a GPU, and each process would come up alone). Under ZeRO-3 with `stage3_param_persistence_threshold=0` every
weight is partitioned, these tiny heads included (the default threshold would keep them whole and hide what
partitioning does). The trainers run as on GPUs (tests/sharded_trainer_run.py, `deepspeed` mode): the same losses and
weights after 2 steps as one process (losses to 1e-5 relative, weights to 1e-6); under ZeRO-3 (with `zero3_init_flag`,
as TRL's zero3.yaml) one student's head is untied (a separate `lm_head` whose own forward never runs), OPRD trains its
projector, `save_model` writes it to its own file, and a trainer resuming from DeepSpeed's checkpoint ends at the
uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is installed by scripts/setup.sh")

SCRIPT = Path(__file__).resolve().parent / "sharded_trainer_run.py"


def zero_config(stage: int) -> dict:
    return {
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto", "gradient_clipping": "auto",
    }


def run_both(kind: str, stage: int, tmp_path) -> tuple[dict, dict]:
    """The 1-process run and the 2-process DeepSpeed ZeRO-`stage` run of tests/sharded_trainer_run.py."""
    from tiny import launch_two_cpu_processes

    single, sharded, config = tmp_path / "single.json", tmp_path / "deepspeed.json", tmp_path / "zero.json"
    config.write_text(json.dumps(zero_config(stage)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run([sys.executable, str(SCRIPT), "single", str(single), kind], env=env,
                              capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    engine = ("--use_deepspeed", "--deepspeed_config_file", str(config), "--zero3_init_flag", str(stage == 3).lower())
    launch_two_cpu_processes(SCRIPT, "deepspeed", sharded, kind, timeout=900, ACCELERATE_USE_CPU="false",
                             engine=engine)
    one, two = json.loads(single.read_text()), json.loads(sharded.read_text())
    assert two["engine"] == "DeepSpeedEngine" and two["processes"] == 2
    assert two["sharded"] == (stage == 3)  # ZeRO-3 partitions the weights, ZeRO-2 keeps them whole
    return one, two


@pytest.mark.multiprocess
@pytest.mark.parametrize(("kind", "stage"), [("opd_untied_by_path", 3), ("simct", 3), ("rlad", 3), ("opd", 2)])
def test_trainer_under_deepspeed_equals_one_process(tmp_path, kind, stage):
    """OPDTrainer (TIP + top-k + OPRD; untied heads; the models given by path, so loaded partitioned under
    `zero3_init_flag` as TRL's zero3.yaml sets it, and the set-up checks read partitioned heads), SimCTTrainer and
    RLADTrainer (rollouts fixed by prompt and generation index) under ZeRO-3, whose partitioned heads the LM-head
    passes read (the student's inside its forward, the teacher's gathered); OPDTrainer under ZeRO-2."""
    from test_fsdp2 import assert_same_run

    assert_same_run(*run_both(kind, stage, tmp_path))


@pytest.mark.multiprocess
def test_oprd_projector_under_zero3_trains_saves_and_resumes(tmp_path):
    """OPRD's trainable projector partitioned by ZeRO-3: the same run as one process; `save_model` (ZeRO-3 gathers
    the 16-bit weights) writes the projector to `oprd_projector.safetensors`, not to `model.safetensors`; a trainer
    resuming from step 1's DeepSpeed checkpoint ends at the uninterrupted run's losses and weights."""
    from test_fsdp2 import assert_projector_saved_and_resumed, assert_same_run

    one, two = run_both("opd_projector", 3, tmp_path)
    assert_same_run(one, two)
    assert_projector_saved_and_resumed(two)
