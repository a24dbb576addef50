"""ForesightCallback under DDP on 2 CPU processes (gloo): `accelerate launch` runs this file as a script.

`accelerate launch --cpu --num_processes 2` starts a single process unless MPI is set up (accelerate's
multi-CPU path goes through mpirun), so the test uses accelerate's torchrun launcher (`--multi_gpu`) and
`TrainingArguments(use_cpu=True)`, which gives `DistributedType.MULTI_CPU` with the gloo backend.

Two short runs of a tiny causal LM with the callback:
* ``main_process``: only rank 0 evaluates (the metric raises anywhere else) and broadcasts its score;
* ``all_processes``: each rank scores its own half of the validation rows, the scores are averaged.
Each rank writes its decisions and a hash of its final weights; the test checks both ranks agree.
"""

import hashlib
import json
import sys
from pathlib import Path

import pytest

from tiny import end_distributed_run, launch_two_cpu_processes

HERE = Path(__file__).resolve()


@pytest.mark.multiprocess
def test_two_processes_take_the_same_decisions_and_end_with_the_same_weights(tmp_path):
    launch_two_cpu_processes(HERE, tmp_path, timeout=170)
    for mode in ("main_process", "all_processes"):
        rank0, rank1 = (json.loads((tmp_path / f"{mode}-rank{r}.json").read_text()) for r in (0, 1))
        assert rank0["world_size"] == rank1["world_size"] == 2
        assert rank0["distributed_type"] == "DistributedType.MULTI_CPU"
        assert [r["step"] for r in rank0["history"]] == [1, 2, 4]
        assert rank0["history"] == rank1["history"], mode
        assert any(record["alpha"] > 0 for record in rank0["history"]), (
            "no candidate accepted: the test is too weak"
        )
        assert rank0["logged"] == rank1["logged"] == [r["alpha"] for r in rank0["history"]]
        assert rank0["weights_sha256"] == rank1["weights_sha256"], mode
    # Rank-local scores differ in "all_processes" mode, so agreement there needs the all-reduce.
    assert json.loads((tmp_path / "all_processes-rank0.json").read_text())["local_scores_differ"]


# ------------------------------------------------------------------------------- the launched script


def _run(out_dir: Path, mode: str) -> None:
    import torch
    from accelerate import PartialState
    from datasets import Dataset
    from tiny import prompt_dataset, tiny_model, tiny_tokenizer
    from transformers import Trainer, TrainingArguments

    from trl_opd.callbacks import ForesightCallback

    state = PartialState(cpu=True)
    rank, world_size = state.process_index, state.num_processes
    tokenizer = tiny_tokenizer()
    texts = [row["prompt"] + row["completion"] for row in prompt_dataset(32)]
    encoded = tokenizer(texts, padding="max_length", max_length=24, truncation=True)
    data = Dataset.from_dict({**encoded, "labels": encoded["input_ids"]})
    rows = slice(rank, 16, world_size) if mode == "all_processes" else slice(0, 16)
    validation = {key: torch.tensor(encoded[key][rows]) for key in ("input_ids", "attention_mask")}
    local_scores = []

    def metric(model):
        if mode == "main_process" and rank != 0:
            raise AssertionError("only rank 0 evaluates in main_process mode")
        score = -model(**validation, labels=validation["input_ids"]).loss.item()
        local_scores.append(score)
        return score

    callback = ForesightCallback(metric, evaluate_on=mode)
    args = TrainingArguments(
        output_dir=str(out_dir / mode),
        use_cpu=True,
        report_to="none",
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        logging_steps=100,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=tiny_model(tokenizer), args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    digest = hashlib.sha256()
    for name, parameter in sorted(trainer.model.state_dict().items()):
        digest.update(name.encode() + parameter.detach().cpu().contiguous().numpy().tobytes())
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, local_scores)
    report = {
        "world_size": world_size,
        "distributed_type": str(state.distributed_type),
        "history": [{k: v for k, v in r.items() if k != "eval_seconds"} for r in callback.history],
        "logged": [e["foresight/alpha"] for e in trainer.state.log_history if "foresight/alpha" in e],
        "weights_sha256": digest.hexdigest(),
        "local_scores_differ": any(a != b for a, b in zip(gathered[0], gathered[-1])),
    }
    (out_dir / f"{mode}-rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for evaluate_on in ("main_process", "all_processes"):
        _run(out, evaluate_on)
    end_distributed_run()
