"""TIP: on-policy distillation on the most informative half of the tokens (arXiv 2604.14084, methods.md §3).

TIP is OPD with `token_selection` switched on, so this script has `opd.py`'s lines: the YAML does the rest
(`token_selection: tip_soft_or`, `token_ratio: 0.5`, `loss_reduction: weighted_mean`).

    accelerate launch recipes/tip.py --config recipes/tip.yaml          # Qwen3-8B -> Qwen3-4B (GPUs, the Hub)
    accelerate launch recipes/tip.py --config recipes/toy/tip.yaml      # offline toy on the testbed, CPU, minutes

Any YAML key can be overridden on the command line, e.g. `--token_selection tip_q3 --token_ratio 0.2`.
"""

from __future__ import annotations

from trl_opd import OPDConfig, OPDTrainer
from trl_opd.recipes import RecipeArguments, load_models_and_data, parse_recipe_args, save_run


def main(recipe: RecipeArguments, args: OPDConfig, model_args) -> None:
    setup = load_models_and_data(recipe, args, model_args)  # the toy testbed (teacher evaluated) or real models
    trainer = OPDTrainer(
        model=setup.student,
        teacher_model=setup.teacher,
        args=args,
        train_dataset=setup.train_dataset,
        processing_class=setup.tokenizer,
        peft_config=setup.peft_config,
    )
    setup.evaluate("student before", trainer.model)  # the toy's held-out accuracy (real models: nothing)
    trainer.train()
    save_run(trainer)  # the model, trainer_state.json and, with diagnostics_steps, the diagnostics plots
    setup.evaluate("student after", trainer.model)
    setup.report(args.output_dir)  # the toy's teacher / before / after and the share of the gap recovered


if __name__ == "__main__":
    main(*parse_recipe_args(OPDConfig))
