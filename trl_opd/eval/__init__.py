"""Math evaluation: bundled benchmarks, grading, metrics, generation backends, reports.

```python
from trl_opd.eval import evaluate_math, load_benchmark, grade, pass_at_k

summary = evaluate_math("out/checkpoint", ["aime24", "aime25"], n=16, output_dir="eval_out")
```

Everything here imports without torch or transformers (they load when a model is); only ``MathEvalCallback``
needs transformers, so it is imported on first use.
"""

from pathlib import Path

from trl_opd.eval.benchmarks import BENCHMARKS, list_benchmarks, load_benchmark, normalize_dataset
from trl_opd.eval.grading import (
    GradeResult,
    GradingPool,
    answer_classes,
    extract_answer,
    extract_boxed,
    grade,
    grade_many,
    normalize_answer,
)
from trl_opd.eval.metrics import Estimate, avg_at_n, maj_at_n, mean_pass_at_k, pass_at_k
from trl_opd.eval.prompts import DEFAULT_PROMPT_TEMPLATE, PRESETS, build_prompt
from trl_opd.eval.runner import evaluate_math

#: Path of the ``evaluate`` metric module: ``evaluate.load(MATH_ACCURACY_METRIC)``.
MATH_ACCURACY_METRIC = str(Path(__file__).resolve().parent / "metric" / "math_accuracy.py")

__all__ = [
    "BENCHMARKS",
    "DEFAULT_PROMPT_TEMPLATE",
    "Estimate",
    "GradeResult",
    "GradingPool",
    "MATH_ACCURACY_METRIC",
    "MathEvalCallback",
    "PRESETS",
    "answer_classes",
    "avg_at_n",
    "build_prompt",
    "evaluate_math",
    "extract_answer",
    "extract_boxed",
    "grade",
    "grade_many",
    "list_benchmarks",
    "load_benchmark",
    "maj_at_n",
    "mean_pass_at_k",
    "normalize_answer",
    "normalize_dataset",
    "pass_at_k",
]


def __getattr__(name):
    if name == "MathEvalCallback":  # imports transformers: only when asked for
        from trl_opd.eval.callback import MathEvalCallback

        return MathEvalCallback
    raise AttributeError(f"module 'trl_opd.eval' has no attribute {name!r}")
