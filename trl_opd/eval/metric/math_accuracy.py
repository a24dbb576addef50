"""Math answer accuracy as a Hugging Face ``evaluate`` metric, graded by trl_opd (boxed answer + Math-Verify).

Load it from its path (no Hub access needed)::

    import evaluate
    from trl_opd.eval import MATH_ACCURACY_METRIC

    metric = evaluate.load(MATH_ACCURACY_METRIC)
    metric.compute(predictions=["... \\boxed{42}"], references=["42"])
    # one list of samples per problem gives avg@n, pass@k and maj@n:
    metric.compute(predictions=[["\\boxed{1}", "\\boxed{2}"], ["\\boxed{3}", "\\boxed{3}"]], references=["2", "3"])
"""

import datasets
import evaluate

from trl_opd.eval.grading import answer_classes_many, default_pool, grade_many
from trl_opd.eval.metrics import summarize

_DESCRIPTION = """\
Accuracy of math completions: the last \\boxed{} after </think> is compared with the reference answer by a
string/number fast path, then Math-Verify, with a time bound per answer (an overrun counts as wrong).
With several samples per problem it reports avg@n, unbiased pass@k and maj@n (majority vote), each with its
standard error over problems.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: completions, one string per problem, or a list of n sampled completions per problem.
    references: gold answers, one string per problem.
    timeout: seconds allowed per Math-Verify call (default 5).
    ks: the k of pass@k (default: powers of two up to n, and n).
    require_boxed: count completions without \\boxed{} as wrong (default False).
Returns:
    accuracy: mean accuracy (= avg@n), accuracy_stderr, and avg@n, pass@k, maj@n with their *_stderr entries,
    plus grading_timeouts.
"""

_CITATION = """\
@article{chen2021codex, title={Evaluating Large Language Models Trained on Code}, author={Chen, Mark and others},
journal={arXiv preprint arXiv:2107.03374}, year={2021}}
"""


class MathAccuracy(evaluate.Metric):
    def _info(self):
        single = datasets.Features(
            {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
        )
        sampled = datasets.Features(
            {
                "predictions": datasets.Sequence(datasets.Value("string")),
                "references": datasets.Value("string"),
            }
        )
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[sampled, single],
        )

    def _compute(self, predictions, references, timeout=5.0, ks=None, require_boxed=False):
        samples = [[p] if isinstance(p, str) else list(p) for p in predictions]
        flat = [(i, completion) for i, completions in enumerate(samples) for completion in completions]
        pool = default_pool(timeout, None)
        results = grade_many(
            [c for _, c in flat], [references[i] for i, _ in flat], pool=pool, require_boxed=require_boxed
        )
        correct = [[] for _ in samples]
        predicted = [[] for _ in samples]
        for (i, _), result in zip(flat, results):
            correct[i].append(result.correct)
            predicted[i].append(result.predicted)
        classes = answer_classes_many(predicted, pool=pool, timeout=timeout)
        metrics = summarize(correct, classes, ks=ks)
        n = min(len(c) for c in correct)
        metrics.update(
            accuracy=metrics[f"avg@{n}"],
            accuracy_stderr=metrics[f"avg@{n}_stderr"],
            grading_timeouts=sum(result.timed_out for result in results),
        )
        return metrics
