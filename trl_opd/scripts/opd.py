"""On-policy distillation with `trl_opd.OPDTrainer`: OPD, TIP, OPRD, OPSD, PW-OPSD and EDGE-OPD, whose YAMLs differ.

    trl-opd opd --config recipes/opd.yaml            # or recipes/tip.yaml, oprd.yaml, opsd.yaml, pw_opsd.yaml, ...
    accelerate launch recipes/opd.py --config recipes/opd.yaml

TIP is `token_selection` on (methods.md §3); OPRD is `representation_weight` > 0 (§6; with `projector: bridge`
and no `bridge_path`, `trainer.train()` first fits the bridge on the student's rollouts); OPSD and its variants
(§2, §4, §5) have `teacher_model_name_or_path: self`, the student's own frozen initial weights (with LoRA: the
adapter disabled) shown `teacher_prompt_template`. A dataset with `problem` and `solution` columns but no `prompt` (e.g.
siyanzhao/Openthoughts_math_30k_opsd) gets the OPSD student prompt below.
"""

from __future__ import annotations

from trl_opd import OPDConfig, OPDTrainer
from trl_opd.recipes import RecipeArguments, load_models_and_data, save_run

ARGUMENTS = (OPDConfig,)

# The student's message in every OPSD version (methods.md §2.3).
STUDENT_PROMPT = "Problem: {problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."


def with_student_prompt(dataset):
    """Add the OPSD student prompt (a one-message conversation) to rows that only have a `problem`."""
    if "prompt" in dataset.column_names:
        return dataset

    def student_prompt(row):
        return {"prompt": [{"role": "user", "content": STUDENT_PROMPT.format(problem=row["problem"])}]}

    return dataset.map(student_prompt)


def main(recipe: RecipeArguments, args: OPDConfig, model_args) -> None:
    setup = load_models_and_data(recipe, args, model_args)  # the toy testbed (teacher evaluated) or real models
    trainer = OPDTrainer(
        model=setup.student,
        teacher_model="self" if args.uses_self_teacher() else setup.teacher,  # "self": the student's initial weights
        args=args,
        train_dataset=with_student_prompt(setup.train_dataset),
        processing_class=setup.tokenizer,
        peft_config=setup.peft_config,
    )
    setup.evaluate("student before", trainer.model)  # the toy's held-out accuracy (real models: nothing)
    trainer.train()
    save_run(trainer)  # the model, trainer_state.json and, with diagnostics_steps, the diagnostics plots
    setup.evaluate("student after", trainer.model)
    setup.report(args.output_dir)  # the toy's teacher / before / after and the share of the gap recovered
