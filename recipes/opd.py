"""On-policy distillation with `trl_opd.OPDTrainer`.

Real models (YAML keys are exactly the fields of ScriptArguments, OPDConfig and ModelConfig):

    accelerate launch recipes/opd.py --config recipes/opd.yaml

The offline toy (a synthetic arithmetic task with a teacher trained from scratch; runs on a CPU in minutes and
prints teacher accuracy, student accuracy before and after, and the share of the gap recovered):

    accelerate launch recipes/opd.py --config recipes/toy/opd.yaml     # or: python recipes/opd.py --config ...

Any YAML key can be overridden on the command line, e.g. `--divergence forward_kl --max_steps 200`.

The command line `trl-opd opd --config <yaml>` runs the same lines: `main` of `trl_opd/scripts/opd.py` (load
the models and data, build the OPDTrainer, evaluate, train, save, report).
"""

from trl_opd.recipes import parse_recipe_args
from trl_opd.scripts.opd import ARGUMENTS, main

if __name__ == "__main__":
    main(*parse_recipe_args(*ARGUMENTS))  # --config file.yaml plus command-line overrides
