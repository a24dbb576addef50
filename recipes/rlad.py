"""RLAD (trust-region ratio distillation inside GRPO) with `trl_opd.RLADTrainer`.

Real models (YAML keys are exactly the fields of ScriptArguments, RLADConfig and ModelConfig):

    accelerate launch recipes/rlad.py --config recipes/rlad.yaml

The offline toy (the testbed's arithmetic task; prints teacher accuracy, student accuracy before and after, and the
share of the gap recovered):

    accelerate launch recipes/rlad.py --config recipes/toy/rlad.yaml     # or: python recipes/rlad.py --config ...

Rewards: the boxed answer graded like the evaluators (`math_accuracy_reward`, reads the dataset's `answer` or
`solution` column) plus a small format term (`boxed_format_reward`); their weights are `reward_weights` in the YAML.
Plain-text prompts of a real dataset are given the evaluators' instruction ("... put your final answer within
\\boxed{}.") as a user message. `--rlad_alpha 1.0` is plain GRPO; `--aapa_discriminator_path file.pt` adds the AAPA
anchor reward (train the discriminator with `trl_opd.anchor.AnchorDiscriminator`, see bench/bench_rlad.py).

The command line `trl-opd rlad --config <yaml>` runs the same lines: `main` of `trl_opd/scripts/rlad.py` (load
the models and data, build the RLADTrainer, evaluate, train, save, report).
"""

from trl_opd.recipes import parse_recipe_args
from trl_opd.scripts.rlad import ARGUMENTS, main

if __name__ == "__main__":
    main(*parse_recipe_args(*ARGUMENTS))  # --config file.yaml plus command-line overrides
