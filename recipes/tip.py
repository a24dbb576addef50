"""TIP: on-policy distillation on the most informative half of the tokens (arXiv 2604.14084, methods.md §3).

TIP is OPD with `token_selection` switched on, so this script has `opd.py`'s lines: the YAML does the rest
(`token_selection: tip_soft_or`, `token_ratio: 0.5`, `loss_reduction: weighted_mean`).

    accelerate launch recipes/tip.py --config recipes/tip.yaml          # Qwen3-8B -> Qwen3-4B (GPUs, the Hub)
    accelerate launch recipes/tip.py --config recipes/toy/tip.yaml      # offline toy on the testbed, CPU, minutes

Any YAML key can be overridden on the command line, e.g. `--token_selection tip_q3 --token_ratio 0.2`.

The command line `trl-opd tip --config <yaml>` runs the same lines: `main` of `trl_opd/scripts/opd.py` (load
the models and data, build the OPDTrainer, evaluate, train, save, report).
"""

from trl_opd.recipes import parse_recipe_args
from trl_opd.scripts.opd import ARGUMENTS, main

if __name__ == "__main__":
    main(*parse_recipe_args(*ARGUMENTS))  # --config file.yaml plus command-line overrides
