"""FSDP2 (issue 17 item 1, in part) on 2 CPU processes (gloo), against one process on the same global batch:

* the LM-head passes of the OPD objective under torch's `fully_shard` (tests/fsdp2_head_run.py shards the models
  itself): TIP + top-k loss + OPRD + diagnostics, and the sampled-token k3 estimator with the evidence mask (losses
  and every gradient); the diagnostics pass outside a forward reads heads that FSDP2 keeps sharded (DTensors),
  gathered once each;
* OPDTrainer itself on accelerate's FSDP2 path (tests/fsdp2_trainer_run.py; accelerate takes that path only on
  accelerator devices, so the script switches the accelerator to FSDP2 after its creation): TIP + top-k + OPRD,
  the same losses and weights after 2 steps; SimCTTrainer likewise; RLADTrainer (rollouts sampled per process, so
  not comparable value for value) trains sharded with finite losses.
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
@pytest.mark.parametrize("setting", ["tip_top_k_oprd", "k3_evidence"])
def test_sharded_heads_give_the_one_process_loss_and_gradients(results, setting):
    result = results[setting]
    assert result["heads_are_dtensors"]  # the models really are sharded
    assert result["loss"] == pytest.approx(result["reference_loss"], rel=1e-6)
    assert result["max_grad_error"] <= 1e-6 * max(result["max_grad"], 1.0)
    assert result["head_gathers"] == 0  # inside the forwards FSDP2 holds the root parameters, heads included, whole
    assert result["diagnostics_gathers"] >= 1  # outside, output_head gathered the sharded head(s) once each
    assert result["diagnostics_error"] <= 1e-6


TRAINER_SCRIPT = Path(__file__).resolve().parent / "fsdp2_trainer_run.py"


def run_both(kind: str, tmp_path) -> tuple[dict, dict]:
    """The 1-process run and the 2-process FSDP2 run of tests/fsdp2_trainer_run.py for one trainer."""
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


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["opd", "simct"])
def test_trainer_under_accelerates_fsdp2_equals_one_process(tmp_path, kind):
    """OPDTrainer (TIP + top-k + OPRD) and SimCTTrainer on accelerate's FSDP2 path (2 CPU processes x 2 rows, the
    accelerator switched to FSDP2 after its creation, see the script) against 1 process x 4 rows: the same losses
    and weights after 2 steps."""
    import torch

    one, two = run_both(kind, tmp_path)
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two["oprd_loss"] == pytest.approx(one["oprd_loss"], rel=1e-5)
    assert one["weights"].keys() == two["weights"].keys()
    for name in one["weights"]:
        torch.testing.assert_close(torch.tensor(two["weights"][name]), torch.tensor(one["weights"][name]),
                                   rtol=0, atol=1e-6, msg=name)


@pytest.mark.multiprocess
def test_rlad_trainer_trains_under_accelerates_fsdp2(tmp_path):
    """RLADTrainer samples its rollouts per process, so the 2-process values differ from 1 process: it trains
    sharded with finite losses."""
    import math

    _, two = run_both("rlad", tmp_path)
    assert len(two["losses"]) == 2 and all(math.isfinite(loss) for loss in two["losses"])
