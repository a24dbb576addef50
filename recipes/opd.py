"""On-policy distillation with `trl_opd.OPDTrainer`.

Real models (YAML keys are exactly the fields of ScriptArguments, OPDConfig and ModelConfig):

    accelerate launch recipes/opd.py --config recipes/opd.yaml

The offline toy (a synthetic arithmetic task with a teacher trained from scratch; runs on a CPU in minutes and
prints teacher accuracy, student accuracy before and after, and the share of the gap recovered):

    accelerate launch recipes/opd.py --config recipes/toy/opd.yaml     # or: python recipes/opd.py --config ...

Any YAML key can be overridden on the command line, e.g. `--divergence forward_kl --max_steps 200`.
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
