"""Off-policy cold start, then on-policy distillation (methods.md §7.3; arXiv 2604.13016 §5).

1. The first `cold_start_num_prompts` prompts go to the teacher (one sampled answer each, T 0.7, top-p 0.95).
2. Truncated (no EOS), degenerate (repetition loops) and wrong answers (graded against the `answer` column)
   are dropped.
3. TRL's SFTTrainer fine-tunes the student on the rest (full parameters; `cold_start_*` learning rate and
   schedule, the OPD config's batch and precision).
4. OPDTrainer distils the teacher into the SFT checkpoint on the remaining prompts, deduplicated against the
   SFT ones.

With `aligned_prompt_template` (the second recovery recipe, teacher-aligned prompts) the cold-start prompts are all
formatted with the teacher's template, as in the paper, and OPD formats a share `aligned_prompt_ratio` of its
prompts. With `diagnostics_steps` the overlap diagnostics are logged during OPD and plotted to
`<output_dir>/diagnostics/*.png` (needs matplotlib). See docs/methods.md, "OPD dynamics".

Real models (YAML keys are exactly the fields of ScriptArguments, OPDConfig, ModelConfig and
ColdStartArguments):

    accelerate launch recipes/cold_start.py --config my_cold_start.yaml

The offline toy (the testbed's arithmetic task; prints teacher accuracy and the student's before, after the
cold start and after OPD):

    python recipes/cold_start.py --config recipes/toy/cold_start.yaml

Teacher generation uses `model.generate` split across processes; at the paper's scale (200K prompts, 12K
tokens) generate offline with vLLM and pass the filtered rows to `trl_opd.cold_start.cold_start_sft` instead.
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
from trl_opd.recipes import RecipeArguments, load_models_and_data, parse_recipe_args, save_run
from trl_opd.trainers.aligned_prompts import aligned_prompt


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


if __name__ == "__main__":
    main(*parse_recipe_args(OPDConfig, ColdStartArguments))
