"""A 2-process OPDTrainer run (TIP, `weighted_mean`) equals a 1-process run of the same global batch; the same launch
also runs on-policy OPDTrainer (OPRD, TIP soft-OR) and SimCTTrainer for 2 steps with finite losses.

2 processes × 2 rows (`accelerate launch --multi_gpu --num_processes 2` with `use_cpu=True`: torchrun + gloo; the
`--cpu` launcher would start a single process without MPI) against 1 process × 4 rows, dataset completions.
Tolerance: 1e-5 relative on the logged losses and 1e-6 absolute on every trained weight after 2 optimizer steps
(float32 sums in another order; measured: 2e-7 relative on the losses, 1.1e-7 on the weights, which move by
1.5e-3). A mean of per-process means instead of the mean over all selected tokens would miss by far more.
"""

import json
import math
from pathlib import Path

import pytest
import torch

import ddp_equality_run
from tiny import launch_two_cpu_processes

SCRIPT = Path(ddp_equality_run.__file__).resolve()


@pytest.mark.multiprocess
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    launch_two_cpu_processes(SCRIPT, tmp_path / "result.json")
    two = json.loads((tmp_path / "result.json").read_text())
    one = ddp_equality_run.run(str(tmp_path / "one-process"), per_device_train_batch_size=4)
    one.pop("trainer")

    assert (two["num_processes"], one["num_processes"]) == (2, 1)
    assert len(one["losses"]) == len(two["losses"]) == 2
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two["selected_ratio"] == pytest.approx(one["selected_ratio"], rel=1e-6)
    assert two["weights"].keys() == one["weights"].keys()
    for name, weight in one["weights"].items():
        torch.testing.assert_close(torch.tensor(two["weights"][name]), torch.tensor(weight), rtol=0, atol=1e-6,
                                   msg=name)
    initial = ddp_equality_run.tiny_model(ddp_equality_run.tiny_tokenizer(), seed=0)
    moved = max((torch.tensor(one["weights"][name]) - p).abs().max().item() for name, p in initial.named_parameters())
    assert moved > 1e-4  # the runs trained: equal weights are not equal initial weights

    # The same launch: on-policy OPDTrainer (sampling, OPRD, TIP soft-OR) and SimCTTrainer, 2 steps each.
    smoke = two["on_policy_losses"]
    assert {name: len(losses) for name, losses in smoke.items()} == {"opd": 2, "simct": 2}
    assert all(math.isfinite(loss) for losses in smoke.values() for loss in losses)
    assert two["on_policy_losses_per_process"][0] == two["on_policy_losses_per_process"][1]  # logged loss: global


@pytest.mark.multiprocess
def test_nan_on_one_process_stops_the_whole_launch_with_its_message(tmp_path):
    """NaN hidden states on rank 1 only: rank 1 raises FloatingPointError before its backward; rank 0 (finite values)
    is then blocked in DDP's all-reduce, and torchrun ends it when rank 1 exits. The launch fails within seconds,
    with rank 1's message, instead of hanging for the collective's 30-minute timeout. No collective is spent on
    agreeing about finiteness at every step: the launcher's failure propagation already stops the job."""
    # A hang would end in subprocess.TimeoutExpired (the run itself takes ~20 s; 240 s is the failure bound).
    finished = launch_two_cpu_processes(Path(__file__).with_name("ddp_nan_run.py"), tmp_path / "run", timeout=240,
                                        expect_success=False)
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0, output[-3000:]
    assert "FloatingPointError: The teacher's hidden states (and so its logits) are NaN" in output, output[-3000:]


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["opd", "rlad"])
def test_a_launch_whose_processes_would_each_train_alone_is_refused(tmp_path, kind):
    """On a CPU-only machine `accelerate launch --multi_gpu` without `use_cpu` starts 2 processes that accelerate runs
    as 2 lone main processes (what TRL's fsdp2.yaml and multi_gpu.yaml give there): each trainer refuses, naming the
    cause, before it trains; with `use_cpu=True` the same launch joins them and trains."""
    script = Path(__file__).resolve().parent / "lone_process_run.py"
    out = tmp_path / "result.json"
    launch_two_cpu_processes(script, kind, out, "0", expect_success=False, ACCELERATE_USE_CPU="false")
    for rank in (0, 1):
        refused = json.loads((tmp_path / f"result-rank{rank}.json").read_text())["refused"]
        assert "2 processes were launched, but accelerate runs each of them alone" in refused
        assert "use_cpu" in refused
    assert not (tmp_path / kind).exists()  # nothing trained or saved
    launch_two_cpu_processes(script, kind, out, "1")
    assert json.loads((tmp_path / "result-rank0.json").read_text()) == {"processes": 2}
