"""On-policy representation distillation (OPRD, methods.md §6) with `trl_opd.OPDTrainer`.

The student is trained on its own rollouts to match the teacher's hidden states at the selected layers
(`representation_weight` μ), with or without the usual logit loss (`logit_weight`; 0 = representation only,
the paper's main setting, where the student's LM head never runs). A teacher of another width goes through a
trainable linear projector (`projector: linear`) or the frozen low-rank OPRD-Bridge (`projector: bridge`, fitted
on the initial student's rollouts at the start of training). YAML keys are exactly the fields of ScriptArguments,
OPDConfig and ModelConfig:

    accelerate launch recipes/oprd.py --config recipes/oprd.yaml           # real models (GPUs, the Hub)
    accelerate launch recipes/oprd.py --config recipes/toy/oprd.yaml       # offline toy, CPU, minutes

Any YAML key can be overridden on the command line, e.g. `--logit_weight 1.0` for OPD + μ·OPRD.
The trained projector is saved next to the model as `oprd_projector.safetensors`; the model itself loads with
`AutoModelForCausalLM.from_pretrained(output_dir)`.

The command line `trl-opd oprd --config <yaml>` runs the same lines: `main` of `trl_opd/scripts/opd.py` (load
the models and data, build the OPDTrainer, evaluate, train, save, report).
"""

from trl_opd.recipes import parse_recipe_args
from trl_opd.scripts.opd import ARGUMENTS, main

if __name__ == "__main__":
    main(*parse_recipe_args(*ARGUMENTS))  # --config file.yaml plus command-line overrides
