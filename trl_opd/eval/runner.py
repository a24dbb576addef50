"""``evaluate_math``: sample n completions per problem, grade them, report avg@n / pass@k / maj@n."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from trl_opd.eval import backends as backends_module
from trl_opd.eval.backends import Completion, Request, SamplingSettings
from trl_opd.eval.benchmarks import LOCAL_SUFFIXES, load_benchmark, normalize_dataset
from trl_opd.eval.cache import GenerationCache, fingerprint
from trl_opd.eval.grading import GradingPool, answer_classes_many, default_pool, grade_many
from trl_opd.eval.metrics import summarize
from trl_opd.eval.prompts import DEFAULT_PROMPT_TEMPLATE, build_prompt
from trl_opd.eval.report import (
    PLOT_FILE,
    SUMMARY_FILE,
    TABLE_FILE,
    markdown_table,
    plot_results,
    write_jsonl,
    write_summary,
)

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "vllm", "transformers", "openai")


# --------------------------------------------------------------------------------------------------
# Inputs: benchmarks, backend, prompts
# --------------------------------------------------------------------------------------------------


def resolve_benchmarks(benchmarks, *, limit: int | None = None) -> list[tuple[str, Any]]:
    """``(name, dataset)`` pairs from names, datasets, a list of either, or a ``{name: dataset}`` mapping."""
    import datasets

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 problem per benchmark (or None for all), got {limit}.")
    if isinstance(benchmarks, (str, datasets.Dataset)):
        benchmarks = [benchmarks]
    items = benchmarks.items() if isinstance(benchmarks, dict) else [(None, item) for item in benchmarks]
    resolved = []
    for position, (name, item) in enumerate(items):
        if isinstance(item, str):
            is_file = Path(item).suffix.lower() in LOCAL_SUFFIXES
            name, dataset = name or (Path(item).stem if is_file else item), load_benchmark(item)
        elif isinstance(item, datasets.Dataset):
            id_column = "id" if "id" in item.column_names else None
            name = name or f"custom_{position}"
            dataset = normalize_dataset(item, id_column=id_column, source=f"Benchmark {name!r}")
        else:
            raise ValueError(f"A benchmark must be a name or a datasets.Dataset, got {type(item).__name__}.")
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        resolved.append((name, dataset))
    if not resolved:
        raise ValueError("No benchmarks given; pass e.g. benchmarks=['aime24', 'aime25'].")
    return resolved


def model_label(model) -> str:
    """A name for the model in reports and cache fingerprints."""
    if isinstance(model, str):
        return model
    config = getattr(model, "config", None)
    return (
        getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or type(model).__name__
    )


def make_backend(
    model,
    *,
    backend="auto",
    tokenizer=None,
    sampling: SamplingSettings,
    batch_size: int | None = None,
    seed: int = 0,
    base_url: str | None = None,
    api_key: str | None = None,
    max_concurrency: int = 8,
    backend_kwargs: dict | None = None,
):
    """The generation backend for ``model``: see :func:`evaluate_math` for the choices."""
    if not isinstance(backend, str):
        return backend  # a ready backend object: anything with generate(requests), chunk_size, name
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or a backend object, got {backend!r}.")
    kwargs = dict(backend_kwargs or {})
    if backend == "auto":
        if base_url is not None:
            backend = "openai"
        elif isinstance(model, str) and backends_module.vllm_usable():
            backend = "vllm"
        else:
            backend = "transformers"
    if backend == "openai":
        if base_url is None or not isinstance(model, str):
            raise ValueError(
                "The openai backend needs base_url='http://host:port/v1' and model=<served model name>."
            )
        return backends_module.OpenAICompletionsBackend(
            base_url, model, sampling, api_key=api_key, max_concurrency=max_concurrency, **kwargs
        )
    if backend == "vllm":
        if not isinstance(model, str):
            raise ValueError(
                "The vllm backend loads the model itself: pass a path or Hub id, not a model object."
            )
        return backends_module.VLLMBackend(model, sampling, tokenizer=tokenizer, seed=seed, **kwargs)
    if isinstance(model, str):
        return backends_module.TransformersBackend.from_pretrained(
            model, sampling, tokenizer=tokenizer, batch_size=batch_size or 8, **kwargs
        )
    return backends_module.TransformersBackend(model, tokenizer, sampling, batch_size=batch_size or 8)


def sample_seed(seed: int, benchmark: str, problem_id: str, sample: int) -> int:
    """A per-sample seed, stable across runs and resumes."""
    digest = hashlib.sha256(f"{seed}|{benchmark}|{problem_id}|{sample}".encode()).hexdigest()
    return int(digest[:8], 16)


# --------------------------------------------------------------------------------------------------
# Generation and scoring
# --------------------------------------------------------------------------------------------------


def generate_samples(
    backend,
    benchmark: str,
    dataset,
    prompts: Sequence[str],
    n: int,
    *,
    seed: int = 0,
    add_special_tokens: bool = True,
    cache: GenerationCache | None = None,
    progress: bool = False,
) -> list[list[dict]]:
    """``samples[i][j]``: sample j of problem i as a dict (``completion``, ``num_tokens``, ``finish_reason``).

    Samples already in ``cache`` are reused; new ones are added to it batch by batch.
    """
    from tqdm.auto import tqdm

    cache = cache if cache is not None else GenerationCache(None, "")
    ids = dataset["id"]
    samples: list[list[dict | None]] = [[None] * n for _ in ids]
    todo = []
    for i, problem_id in enumerate(ids):
        for j in range(n):
            samples[i][j] = cache.get(problem_id, j, prompts[i])
            if samples[i][j] is None:
                todo.append((i, j))
    total = len(ids) * n
    with tqdm(
        total=total, initial=total - len(todo), desc=benchmark, unit="sample", disable=not progress
    ) as bar:
        chunk_size = max(1, getattr(backend, "chunk_size", 8))
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            requests = [
                Request(prompts[i], sample_seed(seed, benchmark, ids[i], j), add_special_tokens)
                for i, j in chunk
            ]
            completions: list[Completion] = backend.generate(requests)
            if len(completions) != len(requests):
                raise RuntimeError(
                    f"The backend returned {len(completions)} completions for {len(requests)} requests."
                )
            rows = [
                {
                    "id": ids[i],
                    "sample": j,
                    "prompt": prompts[i],
                    "completion": completion.text,
                    "num_tokens": completion.num_tokens,
                    "finish_reason": completion.finish_reason,
                }
                for (i, j), completion in zip(chunk, completions)
            ]
            cache.add(rows)
            for (i, j), row in zip(chunk, rows):
                samples[i][j] = row
            bar.update(len(chunk))
    return samples  # type: ignore[return-value]


def score_samples(
    dataset,
    samples: list[list[dict]],
    *,
    ks: Sequence[int] | None = None,
    pool: GradingPool | None = None,
    timeout: float = 5.0,
    require_boxed: bool = False,
) -> tuple[dict, list[dict]]:
    """Grade ``samples`` (from :func:`generate_samples`) against ``dataset``; returns metrics and per-sample rows."""
    answers = dataset["answer"]
    flat = [(i, j) for i, problem_samples in enumerate(samples) for j in range(len(problem_samples))]
    results = grade_many(
        [samples[i][j]["completion"] for i, j in flat],
        [answers[i] for i, _ in flat],
        timeout=timeout,
        pool=pool,
        require_boxed=require_boxed,
    )
    correct = [[False] * len(problem_samples) for problem_samples in samples]
    predicted = [[None] * len(problem_samples) for problem_samples in samples]
    for (i, j), result in zip(flat, results):
        correct[i][j], predicted[i][j] = result.correct, result.predicted
    classes = answer_classes_many(predicted, pool=pool, timeout=timeout)
    metrics = summarize(correct, classes, ks=ks)
    every = [samples[i][j] for i, j in flat]
    metrics.update(
        num_problems=len(samples),
        n=min(len(problem_samples) for problem_samples in samples),
        grading_timeouts=sum(result.timed_out for result in results),
        grading_errors=sum(result.method == "error" for result in results),
        no_answer_fraction=sum(result.predicted is None for result in results) / len(results),
        truncated_fraction=sum(sample["finish_reason"] == "length" for sample in every) / len(every),
        mean_completion_tokens=sum(sample["num_tokens"] for sample in every) / len(every),
    )
    rows = [
        {
            "id": samples[i][j]["id"],
            "sample": j,
            "answer": answers[i],
            "predicted": result.predicted,
            "correct": result.correct,
            "grading": result.method,
            "finish_reason": samples[i][j]["finish_reason"],
            "num_tokens": samples[i][j]["num_tokens"],
            "completion": samples[i][j]["completion"],
        }
        for (i, j), result in zip(flat, results)
    ]
    return metrics, rows


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "__", name)


# --------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------


def evaluate_math(
    model,
    benchmarks,
    *,
    n: int = 16,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int = 32768,
    backend="auto",
    output_dir: str | Path | None = None,
    tokenizer=None,
    top_k: int | None = None,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    system_prompt: str | None = None,
    use_chat_template: bool | None = None,
    enable_thinking: bool | None = True,
    seed: int = 0,
    batch_size: int | None = None,
    limit: int | None = None,
    ks: Sequence[int] | None = None,
    grading_timeout: float = 5.0,
    grading_workers: int | None = None,
    require_boxed: bool = False,
    base_url: str | None = None,
    api_key: str | None = None,
    max_concurrency: int = 8,
    backend_kwargs: dict | None = None,
    resume: bool = True,
    plot: bool = False,
    progress: bool = True,
) -> dict:
    r"""Evaluate ``model`` on math ``benchmarks``: n samples per problem, graded, with avg@n, pass@k and maj@n.

    Defaults follow DeepSeek-R1 / open-r1 (``landscape.md`` §4.5): 16 samples at temperature 0.6, top-p 0.95,
    32,768 new tokens, the prompt "{problem} Please reason step by step, and put your final answer within
    \boxed{}." inside the chat template (thinking on) when the tokenizer has one. ``PRESETS`` holds other
    published settings: ``evaluate_math(model, ["aime24"], **PRESETS["opsd"])``.

    Args:
        model: a path or Hub id; an in-memory causal LM (pass ``tokenizer=``); a ``(model, tokenizer)`` pair; or,
            for the openai backend, the served model name.
        benchmarks: a bundled name (``aime24``, ``aime25``, ``aimo_aime``, ``aimo_amc``, ``amc23``, ``math500``,
            ``gsm8k``), a local .json/.jsonl/.parquet file, a Hub dataset name, a ``datasets.Dataset`` with
            ``problem`` and ``answer`` columns, or a list / ``{name: dataset}`` mapping of these.
        n: samples per problem. ``ks``: the k of pass@k (default: powers of two up to n, and n).
        backend: ``"auto"`` (openai when ``base_url`` is set, else vLLM when installed and a GPU is present and
            ``model`` is a path, else transformers), ``"vllm"``, ``"transformers"``, ``"openai"``, or a backend
            object. ``batch_size``: sequences per transformers ``generate`` call (default 8).
            ``backend_kwargs``: extra arguments for ``vllm.LLM``, ``from_pretrained`` or the openai backend.
        output_dir: where to write ``generations/<benchmark>.jsonl`` (the resumable cache: a killed run restarts
            without regenerating finished samples), ``samples/<benchmark>.jsonl`` (graded samples),
            ``summary.json``, ``results.md`` and, with ``plot=True``, ``results.png``. None writes nothing.
        resume: reuse the matching samples of ``generations/``; the cache is keyed by model name, sampling
            settings and prompt, so pass False when the weights behind the same path have changed.
        limit: evaluate only the first ``limit`` problems of each benchmark (smoke tests).
        grading_timeout: seconds per Math-Verify call (an overrun counts as wrong and is counted in
            ``grading_timeouts``); ``grading_workers``: grading subprocesses (default min(4, CPUs)).
        require_boxed: a completion without ``\boxed{}`` is wrong (default: Math-Verify searches its end).

    Returns:
        The summary: ``model``, ``backend``, ``settings``, ``versions``, ``output_dir`` and ``benchmarks``:
        ``{name: {"avg@n", "pass@k"..., "maj@n" (fractions in [0, 1]), each with "<metric>_stderr",
        "num_problems", "n", "grading_timeouts", "grading_errors", "no_answer_fraction", "truncated_fraction",
        "mean_completion_tokens"}}``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1 sample per problem, got {n}.")
    if ks is not None and not all(1 <= k <= n for k in ks):
        raise ValueError(f"Every k of pass@k must be in 1..n={n}, got ks={list(ks)}; lower k or raise n.")
    if isinstance(model, tuple):
        model, tokenizer = model
    sampling = SamplingSettings(
        temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens
    )
    resolved = resolve_benchmarks(benchmarks, limit=limit)
    generator = make_backend(
        model,
        backend=backend,
        tokenizer=tokenizer,
        sampling=sampling,
        batch_size=batch_size,
        seed=seed,
        base_url=base_url,
        api_key=api_key,
        max_concurrency=max_concurrency,
        backend_kwargs=backend_kwargs,
    )
    prompt_tokenizer = getattr(generator, "tokenizer", None) or tokenizer
    settings = dict(
        n=n,
        **asdict(sampling),
        prompt_template=prompt_template,
        system_prompt=system_prompt,
        use_chat_template=use_chat_template,
        enable_thinking=enable_thinking,
        seed=seed,
        grading_timeout=grading_timeout,
        require_boxed=require_boxed,
    )
    summary = {
        "model": model_label(model),
        "backend": getattr(generator, "name", type(generator).__name__),
        "settings": settings,
        "versions": _versions(),
        "output_dir": str(output_dir) if output_dir else None,
        "benchmarks": {},
    }
    cache_key = fingerprint({"model": summary["model"], **asdict(sampling)})
    root = Path(output_dir) if output_dir is not None else None
    pool = default_pool(grading_timeout, grading_workers)
    try:
        for name, dataset in resolved:
            built = [
                build_prompt(
                    problem,
                    prompt_tokenizer,
                    template=prompt_template,
                    system_prompt=system_prompt,
                    use_chat_template=use_chat_template,
                    enable_thinking=enable_thinking,
                )
                for problem in dataset["problem"]
            ]
            settings["chat_template"] = bool(built and built[0][1])
            cache = GenerationCache(
                root / "generations" / f"{_file_stem(name)}.jsonl" if root else None, cache_key, resume=resume
            )
            samples = generate_samples(
                generator,
                name,
                dataset,
                [text for text, _ in built],
                n,
                seed=seed,
                cache=cache,
                add_special_tokens=not settings["chat_template"],
                progress=progress,
            )
            metrics, rows = score_samples(
                dataset, samples, ks=ks, pool=pool, timeout=grading_timeout, require_boxed=require_boxed
            )
            summary["benchmarks"][name] = metrics
            if root is not None:  # written after each benchmark, so partial results are visible
                write_jsonl(root / "samples" / f"{_file_stem(name)}.jsonl", rows)
                _write_reports(root, summary, plot=False)
    finally:
        if isinstance(backend, str):  # we built it, we release it (a caller's backend object stays open)
            generator.close()
    if root is not None:
        _write_reports(root, summary, plot=plot)
    return summary


def _write_reports(root: Path, summary: dict, *, plot: bool) -> None:
    write_summary(root / SUMMARY_FILE, summary)
    (root / TABLE_FILE).write_text(markdown_table(summary), encoding="utf-8")
    if plot:
        plot_results(summary, root / PLOT_FILE)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("trl_opd", "math-verify", "transformers", "vllm"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found
