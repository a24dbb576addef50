"""RLAD (trust-region ratio distillation inside GRPO) with `trl_opd.RLADTrainer`.

    trl-opd rlad --config recipes/rlad.yaml
    accelerate launch recipes/rlad.py --config recipes/rlad.yaml

Rewards: the boxed answer graded like the evaluators (`math_accuracy_reward`, reads the dataset's `answer` or
`solution` column) plus a small format term (`boxed_format_reward`); their weights are `reward_weights` in the YAML.
Plain-text prompts of a real dataset are given the evaluators' instruction ("... put your final answer within
\\boxed{}.") as a user message.
"""

from __future__ import annotations

from trl_opd import RLADConfig, RLADTrainer
from trl_opd.eval.prompts import render_problem
from trl_opd.recipes import RecipeArguments, load_models_and_data, save_run
from trl_opd.rewards import boxed_format_reward, math_accuracy_reward

ARGUMENTS = (RLADConfig,)
REWARD_FUNCS = [math_accuracy_reward, boxed_format_reward]


def with_math_instruction(dataset):
    """Plain-text prompts become one user message asking for a boxed answer; conversational prompts stay."""
    if isinstance(dataset[0]["prompt"], list):
        return dataset
    return dataset.map(lambda row: {"prompt": [{"role": "user", "content": render_problem(row["prompt"])}]})


def main(recipe: RecipeArguments, args: RLADConfig, model_args) -> None:
    setup = load_models_and_data(recipe, args, model_args)  # the toy testbed (teacher evaluated) or real models
    trainer = RLADTrainer(
        model=setup.student,
        teacher_model=setup.teacher,
        reward_funcs=REWARD_FUNCS,
        args=args,
        train_dataset=setup.train_dataset if recipe.testbed else with_math_instruction(setup.train_dataset),
        processing_class=setup.tokenizer,
        peft_config=setup.peft_config,
    )
    setup.evaluate("student before", trainer.model)  # the toy's held-out accuracy (real models: nothing)
    trainer.train()
    save_run(trainer)  # the model, trainer_state.json and, with diagnostics_steps, the diagnostics plots
    setup.evaluate("student after", trainer.model)
    setup.report(args.output_dir)  # the toy's teacher / before / after and the share of the gap recovered
