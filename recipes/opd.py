"""On-policy distillation with `trl_opd.OPDTrainer`.

Real models (YAML keys are exactly the fields of ScriptArguments, OPDConfig and ModelConfig):

    accelerate launch recipes/opd.py --config recipes/opd.yaml

The offline toy (a synthetic arithmetic task with a teacher trained from scratch; runs on a CPU in minutes and
prints teacher accuracy, student accuracy before and after, and the share of the gap recovered):

    accelerate launch recipes/opd.py --config recipes/toy/opd.yaml     # or: python recipes/opd.py --config ...

Any YAML key can be overridden on the command line, e.g. `--divergence forward_kl --max_steps 200`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `recipes/common.py` when run as a script

from common import RecipeArguments, distil, load_models_and_data, parse_recipe_args  # noqa: E402
from trl_opd import OPDConfig, OPDTrainer  # noqa: E402


def main(recipe: RecipeArguments, args: OPDConfig, model_args) -> None:
    distil(OPDTrainer, load_models_and_data(recipe, args, model_args), args)


if __name__ == "__main__":
    main(*parse_recipe_args(OPDConfig))
