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
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `recipes/common.py` when run as a script

from common import parse_recipe_args  # noqa: E402
from opd import main  # noqa: E402  (OPRD is OPD with representation_weight > 0: the YAML does the rest)
from trl_opd import OPDConfig  # noqa: E402

# With projector=bridge and no bridge_path, `trainer.train()` first fits the bridge (Stage 1) on the student's rollouts.

if __name__ == "__main__":
    main(*parse_recipe_args(OPDConfig))
