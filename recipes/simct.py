"""Cross-tokenizer on-policy distillation (SimCT, arXiv 2605.07711) with `trl_opd.SimCTTrainer`.

The teacher has its own tokenizer (`teacher_tokenizer_name_or_path`, default: the teacher model's path). YAML keys are
exactly the fields of ScriptArguments, SimCTConfig and ModelConfig:

    accelerate launch recipes/simct.py --config recipes/simct.yaml

`--cross_tokenizer_loss uld` runs the ULD / GOLD baseline, `--cross_tokenizer_loss simple` the 1:1-anchor ablation.
The paper warms the student up with SFT on the teacher's shortest correct responses first (methods.md §8.3): run
`recipes/cold_start.py` before this recipe and point `model_name_or_path` at its output.

Offline toy (a character-level teacher and a BPE student on the testbed, CPU, minutes):

    accelerate launch --cpu recipes/simct.py --config recipes/toy/simct.yaml

The command line `trl-opd simct --config <yaml>` runs the same lines: `main` of `trl_opd/scripts/simct.py` (load
the models and data, build the SimCTTrainer, evaluate, train, save, report).
"""

from trl_opd.recipes import parse_recipe_args
from trl_opd.scripts.simct import ARGUMENTS, main

if __name__ == "__main__":
    main(*parse_recipe_args(*ARGUMENTS))  # --config file.yaml plus command-line overrides
