r"""On-policy self-distillation: the student's own frozen weights, shown a reference solution, are the teacher.

OPSD (arXiv 2601.18734, methods.md §2), PW-OPSD (position weights, §4) and EDGE-OPD (guided rollouts and an
evidence mask, §5) share this script; their YAMLs differ:

    accelerate launch recipes/opsd.py --config recipes/opsd.yaml        # Qwen3-4B, LoRA (GPUs, the Hub)
    accelerate launch recipes/opsd.py --config recipes/pw_opsd.yaml
    accelerate launch recipes/opsd.py --config recipes/edge_opd.yaml
    accelerate launch recipes/opsd.py --config recipes/toy/opsd.yaml    # offline toy on the testbed, CPU

`teacher_model_name_or_path: self` makes the teacher the student's initial weights (with LoRA: the adapter
disabled). The teacher's prompt is `teacher_prompt_template` filled with the row's `teacher_problem_column` (or the
student's prompt) and `teacher_context_column`. A dataset with `problem` and `solution` columns but no `prompt`
(e.g. siyanzhao/Openthoughts_math_30k_opsd) gets the OPSD student prompt below.
"""

from __future__ import annotations

from trl_opd import OPDConfig, OPDTrainer
from trl_opd.recipes import RecipeArguments, load_models_and_data, parse_recipe_args, save_run

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


if __name__ == "__main__":
    main(*parse_recipe_args(OPDConfig))
