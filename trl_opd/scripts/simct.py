"""Cross-tokenizer on-policy distillation (SimCT, arXiv 2605.07711) with `trl_opd.SimCTTrainer`.

    trl-opd simct --config recipes/simct.yaml
    accelerate launch recipes/simct.py --config recipes/simct.yaml

The teacher has its own tokenizer (`teacher_tokenizer_name_or_path`, default: the teacher model's path).
"""

from __future__ import annotations

from trl_opd import SimCTConfig, SimCTTrainer
from trl_opd.recipes import RecipeArguments, load_models_and_data, save_run

ARGUMENTS = (SimCTConfig,)


def main(recipe: RecipeArguments, args: SimCTConfig, model_args) -> None:
    setup = load_models_and_data(recipe, args, model_args)  # the toy testbed (teacher evaluated) or real models
    trainer = SimCTTrainer(
        model=setup.student,
        teacher_model=setup.teacher,  # with its own tokenizer (`teacher_tokenizer_name_or_path`)
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
