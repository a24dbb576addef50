#!/usr/bin/env python
"""Evaluate a model on AIME 2024 and AIME 2025 (avg@n, pass@k, maj@n). Run with --help for the options."""

import sys

from trl_opd.eval.cli import main

DESCRIPTION = """\
Evaluate a model on AIME 2024 (30 problems) and AIME 2025 (30 problems), bundled offline.
Samples --n completions per problem (DeepSeek-R1 defaults: 16 samples, temperature 0.6, top-p 0.95,
32768 new tokens, the 'reason step by step ... \\boxed{}' prompt in the chat template), grades them
and reports avg@n, pass@k and maj@n."""

if __name__ == "__main__":
    sys.exit(main(prog="eval/aime.py", description=DESCRIPTION, default_benchmarks=["aime24", "aime25"]))
