"""Evaluation results on the Hugging Face Hub: ``model-index`` metadata in the model card, a results file, a push.

After training (``trainer.save_model(out)``, ``trainer.create_model_card()``) or evaluation
(``summary = evaluate_math(out, ...)``)::

    write_model_card(out, summary, base_model="Qwen/Qwen3-1.7B")   # README.md + eval_results.json in `out`
    push_to_hub(out, "me/my-distilled-model")                      # the whole folder: weights + card
    push_to_hub(out, "me/my-distilled-model", only_card=True)      # just README.md + eval_results.json

An existing README.md (e.g. TRL's card) keeps its text and metadata; its ``model-index`` entries for the same
benchmark and metric are replaced, and the results table sits between markers so a rerun replaces it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from trl_opd.eval.benchmarks import BENCHMARKS
from trl_opd.eval.report import json_safe, markdown_table, metric_names

RESULTS_FILE = "eval_results.json"
CARD_FILE = "README.md"
_START, _END = "<!-- trl_opd:eval-results:start -->", "<!-- trl_opd:eval-results:end -->"


def _dataset_reference(benchmark: str) -> dict:
    info = BENCHMARKS.get(benchmark)
    if info is None:
        return {"dataset_type": benchmark, "dataset_name": benchmark}
    return {
        "dataset_type": info.hub_dataset,
        "dataset_name": info.title,
        "dataset_split": info.hub_split,
        "dataset_config": info.hub_config,
    }


def eval_results(summary: dict) -> list[EvalResult]:
    """One ``EvalResult`` per benchmark and metric (avg@n, pass@k, maj@n) of an ``evaluate_math`` summary.

    Values are percentages rounded to 0.01; ``metric_args`` records the sampling settings and the standard error.
    """
    settings = summary.get("settings", {})
    recorded = {
        key: settings[key]
        for key in ("n", "temperature", "top_p", "top_k", "max_new_tokens")
        if settings.get(key) is not None
    }
    results = []
    for benchmark, metrics in summary["benchmarks"].items():
        for metric in metric_names(metrics):
            stderr = metrics.get(f"{metric}_stderr")
            args = dict(recorded)
            if stderr is not None and math.isfinite(stderr):
                args["stderr"] = round(100 * stderr, 2)
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="Text Generation",
                    metric_type=metric,
                    metric_name=f"{metric} (%)",
                    metric_value=round(100 * metrics[metric], 2),
                    metric_args=args,
                    **_dataset_reference(benchmark),
                )
            )
    return results


def _merge(old: list[EvalResult] | None, new: list[EvalResult]) -> list[EvalResult]:
    replaced = {(result.dataset_type, result.metric_type) for result in new}
    kept = [result for result in old or [] if (result.dataset_type, result.metric_type) not in replaced]
    return kept + new


def _results_section(summary: dict) -> str:
    return f"{_START}\n## Evaluation results\n\n{markdown_table(summary)}\nFull results: `{RESULTS_FILE}`.\n{_END}"


def _with_section(text: str, section: str) -> str:
    if _START in text and _END in text:
        before, rest = text.split(_START, 1)
        return before + section + rest.split(_END, 1)[1]
    return text.rstrip() + "\n\n" + section + "\n"


def write_model_card(
    folder: str | Path,
    summary: dict,
    *,
    model_name: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
    existing_card: str | Path | None = None,
) -> ModelCard:
    """Write ``folder/README.md`` with the results as ``model-index`` metadata and a table, and ``eval_results.json``.

    Args:
        summary: what :func:`trl_opd.eval.evaluate_math` returned.
        model_name: the name in ``model-index`` (default: the card's, else the folder name).
        existing_card: the card to extend (default: ``folder/README.md`` when it exists).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = Path(existing_card) if existing_card is not None else folder / CARD_FILE
    if source.is_file():
        card = ModelCard.load(source)
    else:
        card = ModelCard(f"---\n{ModelCardData().to_yaml()}\n---\n\n# {model_name or folder.name}\n")
    data = card.data
    data.model_name = model_name or data.model_name or folder.name
    data.eval_results = _merge(data.eval_results, eval_results(summary))
    data.base_model = base_model or data.base_model
    data.license = license or data.license
    data.tags = list(dict.fromkeys([*(data.tags or []), "trl-opd", *(tags or [])]))
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{_with_section(card.text, _results_section(summary))}")
    card.save(folder / CARD_FILE)
    (folder / RESULTS_FILE).write_text(json.dumps(json_safe(summary), indent=2) + "\n", encoding="utf-8")
    return card


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    only_card: bool = False,
    api: HfApi | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` (or, with ``only_card``, its card and results file).

    Call :func:`write_model_card` first. Returns the commit URL.
    """
    folder = Path(folder)
    if not (folder / CARD_FILE).is_file():
        raise ValueError(
            f"{folder / CARD_FILE} does not exist; call write_model_card(folder, summary) first."
        )
    api = api if api is not None else HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        commit_message=commit_message
        or ("Update evaluation results" if only_card else "Upload model and evaluation results"),
        create_pr=create_pr,
        allow_patterns=[CARD_FILE, RESULTS_FILE] if only_card else None,
    )
    return str(getattr(commit, "commit_url", commit))
