"""On-policy representation distillation (OPRD, methods.md §6) with `trl_opd.OPDTrainer`.

The student is trained on its own rollouts to match the teacher's hidden states at the selected layers
(`representation_weight` μ), with or without the usual logit loss (`logit_weight`; 0 = representation only,
the paper's main setting, where the student's LM head never runs). A teacher of another width goes through a
trainable linear projector (`projector: linear`) or the frozen low-rank OPRD-Bridge (`projector: bridge`, fitted
on the initial student's rollouts at the start of training). YAML keys are exactly the fields of ScriptArguments,
OPDConfig and ModelConfig:

    accelerate launch recipes/oprd.py --config recipes/oprd.yaml           # real models (GPUs, the Hub)
    accelerate launch recipes/oprd.py --config recipes/toy/oprd.yaml       # offline toy, CPU, minutes

Any YAML key can be overridden on the command line, e.g. `--logit_weight 1.0` for OPD + μ·OPRD.
The trained projector is saved next to the model as `oprd_projector.safetensors`; the model itself loads with
`AutoModelForCausalLM.from_pretrained(output_dir)`.
"""

from __future__ import annotations

from trl_opd import OPDConfig, OPDTrainer
from trl_opd.recipes import RecipeArguments, load_models_and_data, parse_recipe_args, save_run


def main(recipe: RecipeArguments, args: OPDConfig, model_args) -> None:
    # OPRD is OPD with representation_weight > 0 (the YAML does the rest). With projector=bridge and no
    # bridge_path, `trainer.train()` first fits the bridge (Stage 1) on the student's rollouts.
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
