"""Off-policy cold start, then on-policy distillation (methods.md §7.3; arXiv 2604.13016 §5).

    trl-opd cold-start --config recipes/toy/cold_start.yaml
    accelerate launch recipes/cold_start.py --config my_cold_start.yaml

The teacher answers the first `cold_start_num_prompts` prompts; truncated, degenerate and wrong answers are
dropped; TRL's SFTTrainer fine-tunes the student on the rest; OPDTrainer then distils the teacher into that checkpoint
on the remaining prompts (the steps in detail: recipes/cold_start.py, `trl_opd.cold_start`).
"""

from __future__ import annotations

from trl_opd import OPDConfig, OPDTrainer
from trl_opd.cold_start import (
    ColdStartArguments,
    cold_start_sft,
    filter_completions,
    sft_config,
    split_prompts,
    teacher_answers,
)
from trl_opd.recipes import RecipeArguments, load_models_and_data, save_run
from trl_opd.trainers.aligned_prompts import aligned_prompt

ARGUMENTS = (OPDConfig, ColdStartArguments)


def load_models(setup, args: OPDConfig, model_args):
    """Model objects for both phases (the toy setup already has them; real runs name them by path)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student, teacher, tokenizer = setup.student, setup.teacher, setup.tokenizer
    if isinstance(student, str):
        student = AutoModelForCausalLM.from_pretrained(student, **(args.model_init_kwargs or {}))
    if isinstance(teacher, str):
        teacher = AutoModelForCausalLM.from_pretrained(teacher, **(args.teacher_model_init_kwargs or {}))
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    return student, teacher, tokenizer


def main(recipe: RecipeArguments, args: OPDConfig, model_args, cold: ColdStartArguments) -> None:
    setup = load_models_and_data(recipe, args, model_args)
    student, teacher, tokenizer = load_models(setup, args, model_args)
    sft_rows, opd_rows = split_prompts(setup.train_dataset, cold.cold_start_num_prompts)
    if args.aligned_prompt_template is not None:  # the teacher answers in its own template (paper App. C)
        template = args.aligned_prompt_template
        sft_rows = sft_rows.map(lambda row: {"prompt": aligned_prompt(row["prompt"], template)})
    setup.evaluate("student before", student)

    records = teacher_answers(teacher, tokenizer, sft_rows, cold, seed=args.seed)
    grader = None  # Math-Verify on real data; the toy task's exact boxed-number match on the testbed
    if recipe.testbed is not None:
        from trl_opd.testbed import grade_answer as grader
    kept, counts = filter_completions(
        records,
        grader=grader,
        require_correct=cold.cold_start_require_correct,
        ngram_size=cold.cold_start_ngram_size,
        max_repeated_ngram_share=cold.cold_start_max_repeated_ngram_share,
    )
    setup.results["cold_start_filter"] = counts
    print(
        f"[trl_opd] cold start: kept {counts['kept']} of {counts['total']} teacher answers {counts}",
        flush=True,
    )
    sft = cold_start_sft(student, tokenizer, kept, sft_config(args, cold, f"{args.output_dir}/cold_start"))
    sft.save_model(f"{args.output_dir}/cold_start")
    setup.evaluate("student after cold start", sft.model)

    trainer = OPDTrainer(
        model=sft.model,
        teacher_model=teacher,
        args=args,
        train_dataset=opd_rows,
        processing_class=tokenizer,
        peft_config=setup.peft_config,
    )
    trainer.train()  # no "student before" here: that was measured before the cold start
    save_run(trainer)  # the model, trainer_state.json and, with diagnostics_steps, the diagnostics plots
    setup.evaluate("student after", trainer.model)
    setup.report(args.output_dir)  # the toy's teacher / before / after and the share of the gap recovered

