"""One `main` per training method: what `trl-opd <command>` (trl_opd/cli.py) and the scripts in `recipes/` run.

Each module reads top to bottom: load the models and data (`trl_opd.recipes`), build the trainer, evaluate before,
train, save, evaluate after, report. `ARGUMENTS` are the argument dataclasses its YAML keys are the fields of (besides
`RecipeArguments` and `ModelConfig`), as in TRL's `trl/scripts/*.py`.

    opd         OPDTrainer: OPD, TIP, OPRD, OPSD, PW-OPSD, EDGE-OPD (the YAML picks the method)
    simct       SimCTTrainer: cross-tokenizer OPD
    rlad        RLADTrainer: trust-region ratio distillation inside GRPO
    cold_start  an off-policy cold start (SFT on filtered teacher answers), then OPDTrainer
"""
