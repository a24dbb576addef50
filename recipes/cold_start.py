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

The command line `trl-opd cold-start --config <yaml>` runs the same lines: `main` of
`trl_opd/scripts/cold_start.py` (load the models and data, the cold start, then OPDTrainer, evaluate, save, report).
"""

from trl_opd.recipes import parse_recipe_args
from trl_opd.scripts.cold_start import ARGUMENTS, main

if __name__ == "__main__":
    main(*parse_recipe_args(*ARGUMENTS))  # --config file.yaml plus command-line overrides
