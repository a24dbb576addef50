"""The trainers under accelerate's FSDP2 path and under DeepSpeed on 2 CPU processes, against one process on the same
global batch; used by tests/test_fsdp2.py and tests/test_deepspeed.py (not a test module itself).

DeepSpeed (`deepspeed` mode, launched with `--use_deepspeed --deepspeed_config_file F`): the training config turns
`use_cpu` off and names gloo (`ddp_backend`), and accelerate runs DeepSpeed's engine as on GPUs.

accelerate takes its FSDP branch only on accelerator devices (state.py: MULTI_CPU is never turned into FSDP), so
`FSDP2OnCPU` switches the accelerator's state to FSDP, with the plugin TRL's `fsdp2.yaml` describes, right after the
Trainer creates it; from there the trainer runs accelerate's own FSDP2 preparation (`fully_shard` per decoder layer
and the root, the optimizer on the sharded parameters) over gloo, as on GPUs. Kinds:

* `opd`: dataset completions (`lmbda=0`: deterministic rollouts), TIP (`tip_divergence_only`, per row:
  layout-independent), top-k, OPRD at the last layer (equal widths, no projector);
* `opd_projector`: the same onto a wider teacher, so OPRD trains a linear projector; checkpoints every step, a final
  `save_model` and a second trainer resuming from step 1; `opd_projector_per_rank`: each rank shards the weights it
  built itself (no broadcast from the main process) and the checkpoints are sharded (DCP); `opd_bf16`: `opd` in bf16
  mixed precision;
* `simct`: dataset completions, a character-level teacher;
* `rlad`: rollouts fixed by (prompt, generation index) (`FixedRollouts`: sampling is per process);
* `opd_untied`: `opd` with untied heads (a separate `lm_head` whose own forward never runs); `opd_untied_by_path`:
  the models given by path, so the trainer loads them (partitioned at load under ZeRO-3's `zero3_init_flag`).

    python tests/sharded_trainer_run.py single OUT.json KIND                                   # 1 process x 4 rows
    accelerate launch --multi_gpu --num_processes 2 tests/sharded_trainer_run.py fsdp2 OUT.json KIND    # 2 x 2 rows
    accelerate launch --use_deepspeed --deepspeed_config_file F --num_processes 2 \
        tests/sharded_trainer_run.py deepspeed OUT.json KIND                                            # 2 x 2 rows
"""

import collections
import contextlib
import dataclasses
import json
import os
import random
import sys
from pathlib import Path

import trl
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from safetensors.torch import load_file
from tiny import cpu_args, end_distributed_run, length_reward, prompt_dataset, tiny_model, tiny_tokenizer
from torch.distributed.tensor import DTensor

from trl_opd import OPDConfig, OPDTrainer, RLADConfig, RLADTrainer, SimCTConfig, SimCTTrainer
from trl_opd.testbed.models import tiny_model as char_level_model
from trl_opd.testbed.tokenizers import char_tokenizer

GLOBAL_BATCH = 4
SETTINGS = dict(lmbda=0.0, token_selection="tip_divergence_only", token_ratio=0.5, loss_top_k=8,
                representation_weight=0.01, representation_layers="last")


def on_fsdp2(trainer_class, **plugin_overrides):
    """`trainer_class` whose accelerator runs FSDP2 on CPU processes (see the module docstring), with TRL's
    fsdp2.yaml settings and `plugin_overrides`."""

    class FSDP2OnCPU(trainer_class):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            for state in (self.accelerator.state, PartialState()):  # both singletons carry the type
                state.distributed_type = DistributedType.FSDP
            plugin = trl_fsdp2_plugin(**plugin_overrides)
            if self.accelerator.mixed_precision != "no":  # what accelerate does for an FSDP plugin
                plugin.set_mixed_precision(self.accelerator.mixed_precision)
            self.accelerator.state.fsdp_plugin = plugin
            self.is_fsdp_enabled = True

    return FSDP2OnCPU


def trl_fsdp2_plugin(**overrides) -> FullyShardedDataParallelPlugin:
    """The FSDP2 plugin that `accelerate launch --config_file trl/accelerate_configs/fsdp2.yaml` builds (what
    `trl-opd --accelerate_config fsdp2` uses): its `fsdp_config` keys named as the plugin's fields (`fsdp_version`
    as is, the others without the prefix, `offload_params` as `cpu_offload`); the layers to wrap come from the model's `_no_split_modules`, as there."""
    config = yaml.safe_load((Path(trl.__file__).parent / "accelerate_configs" / "fsdp2.yaml").read_text())
    fields = {field.name for field in dataclasses.fields(FullyShardedDataParallelPlugin)}
    settings = {key if key in fields else key.removeprefix("fsdp_"): value
                for key, value in config["fsdp_config"].items()}
    settings["cpu_offload"] = settings.pop("offload_params")
    settings["auto_wrap_policy"] = settings["auto_wrap_policy"].lower()
    return FullyShardedDataParallelPlugin(**{**settings, **overrides})


class FixedRollouts(RLADTrainer):
    """RLADTrainer whose rollouts are fixed by (prompt, generation index) instead of sampled.

    Sampling draws from each process's RNG (TRL reseeds per process), so a 2-process run samples other completions
    than one process and no value could be compared. Here the k-th copy of a prompt on a process gets the k-th
    completion of that prompt: with `per_device_train_batch_size` = `num_generations` each process holds whole
    groups, so both layouts train on the same completions, and everything after generation (rewards, group
    advantages, old and teacher log-probs, the TRRD loss, the sharded update) is compared value for value."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        copies = collections.Counter()
        completions = []
        for ids in prompt_ids:
            key = tuple(ids)
            draw = random.Random(hash((key, copies[key])))  # a tuple of ints hashes the same in every process
            length = 3 + 4 * copies[key] + draw.randint(0, 3)  # the copies differ in length, so in reward
            text = "".join(draw.choice("abcdefgh+=0123456789") for _ in range(length))
            copies[key] += 1
            completions.append(self.processing_class.encode(text, add_special_tokens=False)[:12])
        return completions, None


def build(kind: str, mode: str, output_dir: str):
    tokenizer = tiny_tokenizer()
    processes = 1 if mode == "single" else 2
    common = cpu_args(max_steps=2, per_device_train_batch_size=GLOBAL_BATCH // processes, max_completion_length=12)
    if mode == "deepspeed":  # on CPU processes DeepSpeed needs use_cpu off and gloo named (accelerate names none)
        common.update(use_cpu=False, ddp_backend="gloo")
    tied = "untied" not in kind  # untied: a separate lm_head module whose own forward never runs
    student = tiny_model(tokenizer, seed=0, tied=tied)

    def wrap(trainer_class):
        if mode != "fsdp2":
            return trainer_class
        if kind.endswith("per_rank"):  # each rank shards the weights it built itself; sharded (DCP) checkpoints
            return on_fsdp2(trainer_class, cpu_ram_efficient_loading=False, state_dict_type="SHARDED_STATE_DICT")
        return on_fsdp2(trainer_class)

    if kind.endswith("bf16"):  # mixed precision, as TRL's fsdp2.yaml runs it
        common.update(bf16=True)
    if kind.startswith("opd"):
        teacher_width = 48 if kind.startswith("opd_projector") else 32  # wider: OPRD trains a linear projector
        if kind.startswith("opd_projector"):
            common.update(save_strategy="steps", save_steps=1)  # checkpoints to resume from
        teacher = tiny_model(tokenizer, hidden=teacher_width, seed=1, tied=tied)
        if kind.endswith("by_path"):  # loaded by the trainer (under ZeRO-3's zero3_init_flag: loaded partitioned)
            student, teacher = (saved(model, tokenizer, output_dir, name)
                                for model, name in ((student, "student"), (teacher, "teacher")))
        return wrap(OPDTrainer)(student, teacher,
                                args=OPDConfig(output_dir=output_dir, **SETTINGS, **common),
                                train_dataset=prompt_dataset(8), processing_class=tokenizer)
    if kind == "simct":
        teacher_tokenizer = char_tokenizer()
        return wrap(SimCTTrainer)(student, char_level_model(teacher_tokenizer, hidden=32, layers=1, heads=2, seed=1),
                                  args=SimCTConfig(output_dir=output_dir, lmbda=0.0, **common),
                                  train_dataset=prompt_dataset(8), processing_class=tokenizer,
                                  teacher_processing_class=teacher_tokenizer)
    common.update(num_generations=2, temperature=1.0, generation_batch_size=GLOBAL_BATCH)
    return wrap(FixedRollouts)(student, length_reward, args=RLADConfig(output_dir=output_dir, **common),
                             train_dataset=prompt_dataset(8), processing_class=tokenizer,
                             teacher_model=tiny_model(tokenizer, hidden=48, seed=1))


def saved(model, tokenizer, output_dir: str, name: str) -> str:
    """`model` and its tokenizer saved for this process alone (every rank builds the same weights); the directory."""
    directory = Path(output_dir).parent / f"{name}-rank{os.environ.get('RANK', '0')}"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def whole(partitioned: list):
    """DeepSpeed ZeRO-3's partitioned parameters gathered whole (a collective on every rank); nothing otherwise."""
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


def describe(trainer) -> dict:
    """Logged losses and every weight, gathered whole (a collective on every rank)."""
    model = trainer.model
    partitioned = [parameter for parameter in model.parameters() if hasattr(parameter, "ds_id")]  # DeepSpeed ZeRO-3
    with whole(partitioned):
        weights = {}
        for name, parameter in model.named_parameters():
            value = parameter.detach()
            weights[name] = (value.full_tensor() if isinstance(value, DTensor) else value).tolist()
    history = trainer.state.log_history
    policy = getattr(getattr(trainer.accelerator.state, "fsdp_plugin", None), "mixed_precision_policy", None)
    return {
        "losses": [entry["loss"] for entry in history if "loss" in entry],
        "oprd_loss": [entry["oprd/loss"] for entry in history if "oprd/loss" in entry],
        "weights": weights,
        "sharded": isinstance(model.lm_head.weight, DTensor) or bool(partitioned),
        "wrapper": type(model).__name__,
        "engine": type(trainer.model_wrapped).__name__,
        "processes": trainer.accelerator.num_processes,
        "mixed_precision": trainer.accelerator.mixed_precision,
        "compute_dtype": str(policy.param_dtype) if policy is not None else None,
    }


def saved_files(trainer, directory: Path) -> dict:
    """`save_model(directory)` (every rank: FSDP2 gathers the full state dict), then what the main process wrote:
    the projector's file and the model file's keys."""
    trainer.save_model(str(directory))
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return {}
    projector = load_file(directory / "oprd_projector.safetensors")
    return {"projector": {key: value.tolist() for key, value in projector.items()},
            "model_keys": sorted(load_file(directory / "model.safetensors"))}


def run(mode: str, out: str, kind: str = "opd") -> None:
    run_dir = Path(out).with_suffix("")
    trainer = build(kind, mode, str(run_dir / "run"))
    trainer.train()
    result = describe(trainer)
    if kind == "opd_projector":  # FULL_STATE_DICT: save_model gathers and writes (SHARDED: TRL/transformers skip it)
        result["saved"] = saved_files(trainer, run_dir / "final")
    if kind.startswith("opd_projector"):
        resumed = build(kind, mode, str(run_dir / "run"))  # a new trainer resuming from step 1's checkpoint
        resumed.train(resume_from_checkpoint=str(run_dir / "run" / "checkpoint-1"))
        result["resumed"] = describe(resumed)
    if trainer.accelerator.is_main_process:
        Path(out).write_text(json.dumps(result))
    if mode != "single":
        end_distributed_run()


if __name__ == "__main__":
    run(*sys.argv[1:])
