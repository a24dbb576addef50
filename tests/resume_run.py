"""Run by `tests/test_resume.py` as one subprocess; not a test module itself.

For each trainer (OPDTrainer with TIP, an OPRD projector onto a wider teacher, the lmbda on/off-policy coin and
a ForesightCallback; SimCTTrainer; RLADTrainer):

1. a forked child trains with a checkpoint every 2 steps and is killed with SIGKILL during step 3, after
   checkpoint-2 is complete (its `trainer_state.json`, written last, exists) and before checkpoint-4;
2. the parent adds a half-written `checkpoint-3` (what a kill during a save leaves: no `trainer_state.json`) and
   resumes the run with `resume_from_checkpoint=True` (what a user does after a crash), which must skip it and
   continue from checkpoint-2 up to step 4;
3. the parent runs the same 4 steps uninterrupted.

The children are forked before this process runs any torch op, so the imports (most of the cost) are paid once.
The per-step logged losses (and the Foresight history) of (2) and (3) are written as JSON to the path named on the
command line.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformers import TrainerCallback  # noqa: E402

from tiny import cpu_args, prompt_dataset, tiny_model, tiny_tokenizer  # noqa: E402
from trl_opd import OPDConfig, OPDTrainer, RLADConfig, RLADTrainer, SimCTConfig, SimCTTrainer  # noqa: E402
from trl_opd.callbacks import ForesightCallback  # noqa: E402

KINDS = ("opd", "simct", "rlad")
MAX_STEPS, SAVE_STEPS, KILL_AT = 4, 2, 3
KILL_MARKER = "killed-here"


def char_variety_reward(prompts, completions, **kwargs):
    return [float(len(set(text))) for text in completions]


class BlockAt(TrainerCallback):
    """In the child: once step `KILL_AT` is done, tell the parent and wait to be killed."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == KILL_AT:
            (Path(args.output_dir) / KILL_MARKER).write_text(str(os.getpid()))
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and os.getppid() != 1:  # never outlive the parent
                time.sleep(0.05)
            os._exit(3)
        return control


def foresight(tokenizer):
    """Triggers at steps 1 and 4: the anchor saved in checkpoint-2 is step 1's weights, not checkpoint-2's, so a
    lost anchor would change step 4's record."""
    encoded = tokenizer([row["prompt"] + row["completion"] for row in prompt_dataset(8)], padding=True,
                        return_tensors="pt")

    def metric(model):
        batch = {key: value.to(model.device) for key, value in encoded.items()}
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return -model(**batch, labels=labels).loss.item()

    return ForesightCallback(metric, schedule=[1, 4])


def build(kind: str, output_dir: Path, callbacks=()):
    tokenizer = tiny_tokenizer()
    common = cpu_args(max_steps=MAX_STEPS, save_strategy="steps", save_steps=SAVE_STEPS, output_dir=str(output_dir))
    if kind == "opd":
        args = OPDConfig(token_selection="tip_entropy_sample", token_ratio=0.5, representation_weight=1.0,
                         lmbda=0.5, gradient_accumulation_steps=2, **{**common, "per_device_train_batch_size": 2})
        trainer = OPDTrainer(tiny_model(tokenizer, seed=0), tiny_model(tokenizer, hidden=48, layers=3, seed=1),
                             args=args, train_dataset=prompt_dataset(), processing_class=tokenizer,
                             callbacks=[foresight(tokenizer), *callbacks])
    elif kind == "simct":
        from trl_opd.testbed.models import tiny_model as char_level_model
        from trl_opd.testbed.tokenizers import char_tokenizer

        teacher_tokenizer = char_tokenizer()
        teacher = char_level_model(teacher_tokenizer, hidden=32, layers=1, heads=2, seed=1)
        trainer = SimCTTrainer(tiny_model(tokenizer, seed=0), teacher, args=SimCTConfig(**common),
                               train_dataset=prompt_dataset(), processing_class=tokenizer,
                               teacher_processing_class=teacher_tokenizer, callbacks=list(callbacks))
    else:
        args = RLADConfig(num_generations=4, temperature=0.7, **common)
        trainer = RLADTrainer(tiny_model(tokenizer, seed=0), char_variety_reward, args=args,
                              train_dataset=prompt_dataset(), processing_class=tokenizer,
                              teacher_model=tiny_model(tokenizer, hidden=48, seed=1), callbacks=list(callbacks))
    return trainer


def kill_mid_run(kind: str, output_dir: Path) -> None:
    pid = os.fork()
    if pid == 0:  # the child: train until BlockAt, where the parent kills it
        try:
            build(kind, output_dir, callbacks=[BlockAt()]).train()
        finally:
            os._exit(4)  # reaching the end (or an error) is a failure: the parent sees the exit code
    marker = output_dir / KILL_MARKER
    deadline = time.monotonic() + 400
    while not marker.exists():
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished:
            raise RuntimeError(f"{kind}: the child exited with status {status} before reaching step {KILL_AT}")
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise RuntimeError(f"{kind}: the child did not reach step {KILL_AT} in time")
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def main(result_path: str) -> None:
    root = Path(result_path).parent
    for kind in KINDS:  # forks first, while this process has run no torch op
        kill_mid_run(kind, root / kind / "killed")
    results = {}
    for kind in KINDS:
        killed_dir = root / kind / "killed"
        checkpoints = sorted(path.name for path in killed_dir.glob("checkpoint-*"))
        # A kill while saving leaves a checkpoint without its trainer_state.json (written last): resume must skip it.
        half_written = killed_dir / "checkpoint-3"
        half_written.mkdir()
        (half_written / "model.safetensors").write_bytes(b"truncated")
        resumed = build(kind, killed_dir)
        resumed.train(resume_from_checkpoint=True)
        full = build(kind, root / kind / "full")
        full.train()
        result = {"checkpoints_after_kill": checkpoints, "full": losses(full), "resumed": losses(resumed)}
        foresights = [next((c for c in t.callback_handler.callbacks if isinstance(c, ForesightCallback)), None)
                      for t in (full, resumed)]
        if foresights[0] is not None:
            strip = [[{k: v for k, v in r.items() if k != "eval_seconds"} for r in f.history] for f in foresights]
            result["foresight_full"], result["foresight_resumed"] = strip
        result["max_weight_difference"] = max(
            (a - b).abs().max().item() for a, b in zip(full.model.parameters(), resumed.model.parameters())
        )
        results[kind] = result
        del resumed, full
    Path(result_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
