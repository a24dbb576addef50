"""TIP: on-policy distillation on the most informative half of the tokens (arXiv 2604.14084, methods.md §3).

TIP is OPD with `token_selection` switched on, so this script is `opd.py`'s: the YAML does the rest
(`token_selection: tip_soft_or`, `token_ratio: 0.5`, `loss_reduction: weighted_mean`).

    accelerate launch recipes/tip.py --config recipes/tip.yaml          # Qwen3-8B -> Qwen3-4B (GPUs, the Hub)
    accelerate launch recipes/tip.py --config recipes/toy/tip.yaml      # offline toy on the testbed, CPU, minutes

Any YAML key can be overridden on the command line, e.g. `--token_selection tip_q3 --token_ratio 0.2`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `recipes/common.py` and `recipes/opd.py`

from common import parse_recipe_args  # noqa: E402
from opd import main  # noqa: E402
from trl_opd import OPDConfig  # noqa: E402

if __name__ == "__main__":
    main(*parse_recipe_args(OPDConfig))
