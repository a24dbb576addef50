"""Resume without loss: a run killed with SIGKILL mid-way and resumed from its last checkpoint logs the same per-step
losses as an uninterrupted run (CPU, fixed seed), for OPDTrainer (TIP entropy sampling, the lmbda coin, an OPRD
projector onto a wider teacher, ForesightCallback), SimCTTrainer and RLADTrainer.

Before resuming, a half-written `checkpoint-3` (no `trainer_state.json`, what a kill during a save leaves) is planted:
`resume_from_checkpoint=True` must skip it. One subprocess (`tests/resume_run.py`) does every run: it forks the killed children before any torch work, so the
imports are paid once. Tolerance: 1e-6 relative on the losses (on CPU they are in fact bit-identical), 0 on the final
weights' difference up to 1e-6.

Without the checkpoint's RNG state the on-policy rollouts after the resume differ (step 3's OPD loss moves by ~1e-2),
and without the Foresight anchor file the step-4 trigger extrapolates from another anchor: both were checked when
this test was written, so the comparison below is not vacuous.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "resume_run.py"
RELATIVE = 1e-6


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    finished = subprocess.run([sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True,
                              timeout=600, check=False)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("kind", ["opd", "simct", "rlad"])
def test_killed_and_resumed_run_matches_the_uninterrupted_run(results, kind):
    result = results[kind]
    assert result["checkpoints_after_kill"] == ["checkpoint-2"]  # killed during step 3, before checkpoint-4
    assert sorted(result["full"]) == sorted(result["resumed"]) == ["1", "2", "3", "4"]
    for step in ("3", "4"):  # the steps trained after the resume
        assert result["resumed"][step] == pytest.approx(result["full"][step], rel=RELATIVE, abs=1e-12), step
    assert result["max_weight_difference"] <= 1e-6


def test_foresight_anchor_survives_the_kill(results):
    full, resumed = results["opd"]["foresight_full"], results["opd"]["foresight_resumed"]
    assert [record["step"] for record in full] == [record["step"] for record in resumed] == [1, 4]
    assert full[1]["alpha"] > 0  # step 4 moved along θ − θ_anchor, with θ_anchor = step 1's weights
    for expected, got in zip(full, resumed):
        assert got["alpha"] == expected["alpha"]
        assert got["trials"] == expected["trials"]
        assert got["metric_after"] == pytest.approx(expected["metric_after"], rel=RELATIVE)
