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
(e.g. siyanzhao/Openthoughts_math_30k_opsd) gets the OPSD student prompt (`trl_opd.scripts.opd.STUDENT_PROMPT`).

The command line `trl-opd opsd --config <yaml>` runs the same lines: `main` of `trl_opd/scripts/opd.py` (load
the models and data, build the OPDTrainer, evaluate, train, save, report).
"""

from trl_opd.recipes import parse_recipe_args
from trl_opd.scripts.opd import ARGUMENTS, main

if __name__ == "__main__":
    main(*parse_recipe_args(*ARGUMENTS))  # --config file.yaml plus command-line overrides
