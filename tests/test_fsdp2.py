"""FSDP2 (issue 17 item 1, in part) on 2 CPU processes (gloo), against one process on the same global batch:

* the LM-head passes of the OPD objective under torch's `fully_shard` (tests/fsdp2_head_run.py shards the models
  itself): TIP + top-k loss + OPRD + diagnostics, the sampled-token k3 estimator with the evidence mask, and the
  checkpointed loss over several chunks (losses and every gradient; no gather per chunk); the diagnostics pass
  outside a forward reads heads that FSDP2 keeps sharded (DTensors), gathered once each;
* OPDTrainer itself on accelerate's FSDP2 path (tests/sharded_trainer_run.py; accelerate takes that path only on
  accelerator devices, so the script switches the accelerator to FSDP2, with TRL's fsdp2.yaml settings, after its
  creation): TIP + top-k + OPRD, the same losses and weights after 2 steps; OPRD's trainable projector likewise,
  saved to its own file and resumed from an FSDP checkpoint; SimCTTrainer likewise; RLADTrainer likewise with
  rollouts fixed by (prompt, generation index), since sampling is per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from servers import free_port

SCRIPT = Path(__file__).resolve().parent / "fsdp2_head_run.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2") / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(SCRIPT), str(out)]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.multiprocess
@pytest.mark.parametrize("setting", ["tip_top_k_oprd", "k3_evidence", "checkpointed_chunks"])
def test_sharded_heads_give_the_one_process_loss_and_gradients(results, setting):
    result = results[setting]
    assert result["heads_are_dtensors"]  # the models really are sharded
    assert result["loss"] == pytest.approx(result["reference_loss"], rel=1e-6)
    assert result["max_grad_error"] <= 1e-6 * max(result["max_grad"], 1.0)
    assert result["head_gathers"] == 0  # inside the forwards FSDP2 holds the root parameters, heads included, whole
    assert result["diagnostics_gathers"] >= 1  # outside, output_head gathered the sharded head(s) once each
    assert result["diagnostics_error"] <= 1e-6


TRAINER_SCRIPT = Path(__file__).resolve().parent / "sharded_trainer_run.py"


def run_both(kind: str, tmp_path) -> tuple[dict, dict]:
    """The 1-process run and the 2-process FSDP2 run of tests/sharded_trainer_run.py for one trainer."""
    from tiny import launch_two_cpu_processes

    single, sharded = tmp_path / "single.json", tmp_path / "fsdp2.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run([sys.executable, str(TRAINER_SCRIPT), "single", str(single), kind], env=env,
                              capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    launch_two_cpu_processes(TRAINER_SCRIPT, "fsdp2", sharded, kind, timeout=600)
    one, two = json.loads(single.read_text()), json.loads(sharded.read_text())
    assert two["sharded"] and two["wrapper"].startswith("FSDP") and two["processes"] == 2
    return one, two


def assert_same_run(one: dict, two: dict) -> None:
    """The same logged losses (rel 1e-5) and every weight (abs 1e-6) after 2 steps."""
    import torch

    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two["oprd_loss"] == pytest.approx(one["oprd_loss"], rel=1e-5)
    assert one["weights"].keys() == two["weights"].keys()
    for name in one["weights"]:
        torch.testing.assert_close(torch.tensor(two["weights"][name]), torch.tensor(one["weights"][name]),
                                   rtol=0, atol=1e-6, msg=name)


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["opd", "opd_projector_per_rank", "simct", "rlad"])
def test_trainer_under_accelerates_fsdp2_equals_one_process(tmp_path, kind):
    """OPDTrainer (TIP + top-k + OPRD) and SimCTTrainer on accelerate's FSDP2 path (2 CPU processes x 2 rows, the
    accelerator switched to FSDP2 with TRL's fsdp2.yaml settings after its creation, see the script) against
    1 process x 4 rows: the same losses and weights after 2 steps. `opd_projector_per_rank`: OPRD through a
    trainable projector onto a wider teacher, each rank sharding the weights it built itself (no broadcast from the
    main process, `cpu_ram_efficient_loading=False`): its projector is the same on every rank because it is drawn
    from its own seeded generator, not from TRL's per-process reseeded RNG; its checkpoints are sharded (DCP,
    `SHARDED_STATE_DICT`) and a new trainer resuming from step 1's ends at the uninterrupted run."""
    one, two = run_both(kind, tmp_path)
    assert_same_run(one, two)
    if kind == "opd_projector_per_rank":  # with SHARDED_STATE_DICT checkpoints: resuming from step 1 ends the same
        for run in (one, two):
            assert run["resumed"]["losses"] == run["losses"] and run["resumed"]["weights"] == run["weights"]


@pytest.mark.multiprocess
def test_oprd_projector_under_fsdp2_trains_saves_and_resumes(tmp_path):
    """OPRD's trainable projector under TRL's fsdp2.yaml settings (FULL_STATE_DICT): the same run as one process;
    `save_model` writes the gathered projector to `oprd_projector.safetensors` and keeps it out of
    `model.safetensors`; a new trainer resuming from step 1's checkpoint (the FSDP checkpoint holds the sharded
    projector) ends at the uninterrupted run's weights and losses, as on one process."""
    one, two = run_both("opd_projector", tmp_path)
    assert_same_run(one, two)
    assert_projector_saved_and_resumed(two)
    assert_projector_saved_and_resumed(one)


def assert_projector_saved_and_resumed(run: dict) -> None:
    """`save_model` wrote the trained projector, exactly, to its own file and not to `model.safetensors`; the trainer
    resumed from step 1's checkpoint ended at the uninterrupted run's losses and weights."""
    import torch

    trained = {name.split("oprd_projector.", 1)[1]: value for name, value in run["weights"].items()
               if "oprd_projector." in name}
    assert trained and trained.keys() == run["saved"]["projector"].keys()
    for name, value in trained.items():
        assert torch.equal(torch.tensor(run["saved"]["projector"][name]), torch.tensor(value)), name
    assert not any("oprd_projector" in key for key in run["saved"]["model_keys"])
    assert run["resumed"]["losses"] == run["losses"] and run["resumed"]["weights"] == run["weights"]


@pytest.mark.multiprocess
def test_trainer_under_fsdp2_in_bf16_mixed_precision(tmp_path):
    """TRL's fsdp2.yaml trains in bf16 mixed precision (accelerate's fp32 sharded masters, bf16 compute by FSDP2's
    policy) and one process in bf16 autocast: not the same arithmetic, so the same run only within bf16's
    precision (measured: losses to 2e-3 relative, weights to 3e-3 after 2 Adam steps of lr 1e-3)."""
    import math

    import torch

    one, two = run_both("opd_bf16", tmp_path)
    assert one["mixed_precision"] == two["mixed_precision"] == "bf16" and two["compute_dtype"] == "torch.bfloat16"
    assert all(math.isfinite(loss) for loss in two["losses"] + two["oprd_loss"])
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-2)
    assert two["oprd_loss"] == pytest.approx(one["oprd_loss"], rel=1e-2)
    for name in one["weights"]:
        torch.testing.assert_close(torch.tensor(two["weights"][name]), torch.tensor(one["weights"][name]),
                                   rtol=0, atol=1e-2, msg=name)

