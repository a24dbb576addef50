"""FSDP2 (issue 17 item 1, in part): the LM-head passes of the OPD objective under torch's `fully_shard` on 2 CPU
processes (gloo) give the 1-process results on the same global batch: TIP + top-k loss + OPRD + diagnostics, and the
sampled-token k3 estimator with the evidence mask (losses and every gradient); the diagnostics pass outside a forward
reads heads that FSDP2 keeps sharded (DTensors), gathered once each. The harness is tests/fsdp2_head_run.py: it
shards the models itself (accelerate's FSDP plugin, launched on a CPU-only machine, comes up non-distributed, so
the trainers' own FSDP2 path is not run here).
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
