#!/usr/bin/env python
"""Evaluate a model on the AIMO validation sets (AIME 2022-2024 and AMC 2022-2023). Run with --help."""

import sys

from trl_opd.eval.cli import main

DESCRIPTION = """\
Evaluate a model on the AIMO validation sets, bundled offline:
  aimo_aime  AI-MO/aimo-validation-aime, AIME 2022-2024. The offline sources give 89 of its 90
             problems (AIME 2023 I-15 is missing). It contains AIME 2024: do not pool it with aime24.
  aimo_amc   AI-MO/aimo-validation-amc, AMC 12 2022-2023, 83 problems (the "AIMO" column of OPRD).
Samples --n completions per problem (DeepSeek-R1 defaults: 16 samples, temperature 0.6, top-p 0.95,
32768 new tokens), grades them and reports avg@n, pass@k and maj@n."""

if __name__ == "__main__":
    sys.exit(main(prog="eval/aimo.py", description=DESCRIPTION, default_benchmarks=["aimo_aime", "aimo_amc"]))
