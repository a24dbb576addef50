"""OPDTrainer itself under accelerate's FSDP2 path on 2 CPU processes, against one process on the same global batch;
used by tests/test_fsdp2.py (not a test module itself).

accelerate takes its FSDP branch only on accelerator devices (state.py: MULTI_CPU is never turned into FSDP), so
`FSDP2OnCPU` switches the accelerator's state to FSDP with an FSDP2 plugin right after the Trainer creates it; from
there the trainer runs accelerate's own FSDP2 preparation (`fully_shard` per decoder layer and the root, the
optimizer on the sharded parameters) over gloo, as on GPUs. The method: dataset completions (`lmbda=0`:
deterministic rollouts), TIP (`tip_divergence_only`, per row: layout-independent), top-k, OPRD at the last layer.

SimCTTrainer runs the same way (dataset completions, a character-level teacher); RLADTrainer samples its rollouts
per process, so only its run (finite losses, sharded model) is compared, not its values.

    python tests/fsdp2_trainer_run.py single OUT.json [opd|simct|rlad]                                   # 1 x 4 rows
    accelerate launch --multi_gpu --num_processes 2 tests/fsdp2_trainer_run.py fsdp2 OUT.json [opd|simct|rlad]
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accelerate.state import PartialState  # noqa: E402
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from tiny import cpu_args, end_distributed_run, prompt_dataset, tiny_model, tiny_tokenizer  # noqa: E402
from trl_opd import OPDConfig, OPDTrainer, RLADConfig, RLADTrainer, SimCTConfig, SimCTTrainer  # noqa: E402
from trl_opd.testbed.models import tiny_model as char_level_model  # noqa: E402
from trl_opd.testbed.tokenizers import char_tokenizer  # noqa: E402

GLOBAL_BATCH = 4
SETTINGS = dict(lmbda=0.0, token_selection="tip_divergence_only", token_ratio=0.5, loss_top_k=8,
                representation_weight=0.01, representation_layers="last")


def on_fsdp2(trainer_class):
    """`trainer_class` whose accelerator runs FSDP2 on CPU processes (see the module docstring)."""

    class FSDP2OnCPU(trainer_class):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            for state in (self.accelerator.state, PartialState()):  # both singletons carry the type
                state.distributed_type = DistributedType.FSDP
            self.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
                fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
                transformer_cls_names_to_wrap=["Qwen3DecoderLayer"], state_dict_type="SHARDED_STATE_DICT",
            )
            self.is_fsdp_enabled = True

    return FSDP2OnCPU


def char_variety_reward(prompts, completions, **kwargs):
    return [float(len(set(text))) for text in completions]


def build(kind: str, mode: str):
    tokenizer = tiny_tokenizer()
    processes = 2 if mode == "fsdp2" else 1
    common = cpu_args(max_steps=2, per_device_train_batch_size=GLOBAL_BATCH // processes, max_completion_length=12)
    output_dir = f"/tmp/fsdp2-trainer-{kind}-{mode}"
    student = tiny_model(tokenizer, seed=0)

    def wrap(trainer_class):
        return on_fsdp2(trainer_class) if mode == "fsdp2" else trainer_class

    if kind == "opd":
        return wrap(OPDTrainer)(student, tiny_model(tokenizer, hidden=32, seed=1),
                                args=OPDConfig(output_dir=output_dir, **SETTINGS, **common),
                                train_dataset=prompt_dataset(8), processing_class=tokenizer)
    if kind == "simct":
        teacher_tokenizer = char_tokenizer()
        return wrap(SimCTTrainer)(student, char_level_model(teacher_tokenizer, hidden=32, layers=1, heads=2, seed=1),
                                  args=SimCTConfig(output_dir=output_dir, lmbda=0.0, **common),
                                  train_dataset=prompt_dataset(8), processing_class=tokenizer,
                                  teacher_processing_class=teacher_tokenizer)
    common.update(num_generations=2, temperature=1.0, generation_batch_size=GLOBAL_BATCH)
    return wrap(RLADTrainer)(student, char_variety_reward, args=RLADConfig(output_dir=output_dir, **common),
                             train_dataset=prompt_dataset(8), processing_class=tokenizer,
                             teacher_model=tiny_model(tokenizer, hidden=48, seed=1))


def run(mode: str, out: str, kind: str = "opd") -> None:
    trainer = build(kind, mode)
    trainer.train()
    model = trainer.model
    weights = {}
    for name, parameter in model.named_parameters():  # every rank gathers (a collective), the main one writes
        value = parameter.detach()
        weights[name] = (value.full_tensor() if isinstance(value, DTensor) else value).tolist()
    history = trainer.state.log_history
    result = {
        "losses": [entry["loss"] for entry in history if "loss" in entry],
        "oprd_loss": [entry["oprd/loss"] for entry in history if "oprd/loss" in entry],
        "weights": weights,
        "sharded": isinstance(model.lm_head.weight, DTensor),
        "wrapper": type(model).__name__,
        "processes": trainer.accelerator.num_processes,
    }
    if trainer.accelerator.is_main_process:
        Path(out).write_text(json.dumps(result))
    if mode == "fsdp2":
        end_distributed_run()


if __name__ == "__main__":
    run(*sys.argv[1:])
