"""Evaluation reports: per-sample JSONL, summary JSON, a Markdown table and an optional PNG plot."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
TABLE_FILE = "results.md"
PLOT_FILE = "results.png"


def json_safe(value):
    """``value`` with NaN/inf floats replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(json_safe(row), ensure_ascii=False) + "\n")


def write_summary(path: Path, summary: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(summary), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def metric_names(results: dict) -> list[str]:
    """The metric names of a benchmark's results (avg@n, pass@k..., maj@n), without their ``_stderr`` twins."""
    return [name for name in results if "@" in name and not name.endswith("_stderr")]


def _percent(mean: float, stderr: float | None) -> str:
    if stderr is None or not math.isfinite(stderr):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * stderr:.1f}"


def markdown_table(summary: dict) -> str:
    """A Markdown table of every benchmark in ``summary["benchmarks"]`` (percentages ± standard error)."""
    benchmarks = summary["benchmarks"]
    columns: list[str] = []
    for results in benchmarks.values():
        columns += [name for name in metric_names(results) if name not in columns]
    header = ["benchmark", "problems", *columns, "mean tokens", "truncated", "grading timeouts"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, results in benchmarks.items():
        cells = [name, str(results["num_problems"])]
        cells += [_percent(results[c], results.get(f"{c}_stderr")) if c in results else "" for c in columns]
        cells += [
            f"{results['mean_completion_tokens']:.0f}",
            f"{100 * results['truncated_fraction']:.1f}%",
            str(results["grading_timeouts"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    settings = summary.get("settings", {})
    note = ", ".join(
        f"{key}={settings[key]}"
        for key in ("n", "temperature", "top_p", "top_k", "max_new_tokens")
        if key in settings
    )
    return (
        "\n".join(lines)
        + f"\n\nModel: `{summary.get('model')}`; {note}. Values in %, ± standard error over problems.\n"
    )


def plot_results(summary: dict, path: Path) -> Path | None:
    """Bar chart of avg@n and maj@n, and pass@k curves, per benchmark; None (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install matplotlib); skipping the plot.")
        return None
    benchmarks = summary["benchmarks"]
    figure, (bars, curves) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.38
    for offset, prefix in ((-width / 2, "avg@"), (width / 2, "maj@")):
        names = [
            next((m for m in metric_names(r) if m.startswith(prefix)), None) for r in benchmarks.values()
        ]
        values = [100 * r[m] if m else 0.0 for r, m in zip(benchmarks.values(), names)]
        errors = [
            100 * (r.get(f"{m}_stderr") or 0.0) if m else 0.0 for r, m in zip(benchmarks.values(), names)
        ]
        errors = [e if math.isfinite(e) else 0.0 for e in errors]
        positions = [index + offset for index in range(len(benchmarks))]
        bars.bar(positions, values, width, yerr=errors, capsize=3, label=prefix + "n")
    bars.set_xticks(range(len(benchmarks)), list(benchmarks), rotation=20)
    bars.set_ylabel("accuracy (%)")
    bars.set_ylim(0, 100)
    bars.legend()
    for name, results in benchmarks.items():
        ks = sorted(int(m.split("@")[1]) for m in metric_names(results) if m.startswith("pass@"))
        curves.plot(ks, [100 * results[f"pass@{k}"] for k in ks], marker="o", label=name)
    curves.set_xscale("log", base=2)
    curves.set_xlabel("k")
    curves.set_ylabel("pass@k (%)")
    curves.set_ylim(0, 100)
    curves.legend()
    figure.suptitle(str(summary.get("model")))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
