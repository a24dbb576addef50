"""Shared command line of ``eval/aime.py`` and ``eval/aimo.py`` (thin wrappers over :func:`evaluate_math`)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from trl_opd.eval.prompts import PRESETS

_EPILOG = """\
what you get (in --output-dir):
  summary.json            all metrics and settings        results.md   a Markdown table
  samples/<bench>.jsonl   every graded sample             results.png  with --plot
  generations/<bench>.jsonl  the resumable cache: rerun the same command after a crash or kill and
                          finished samples are not generated again (--no-resume starts afresh)

metrics (percent, ± standard error over problems):
  avg@n   mean accuracy of the n samples per problem (= "pass@1" in DeepSeek-R1 / open-r1)
  pass@k  unbiased estimate of "at least one of k samples is right" (Chen et al. 2021)
  maj@n   the most frequent answer among the n samples is right (cons@n)

grading: the last \\boxed{} after </think>, compared with Math-Verify (a time bound per answer).

examples:
  python eval/aime.py --model out/checkpoint-500                       # AIME 2024 + 2025, 16 samples
  python eval/aime.py --model out --n 64 --benchmarks aime24           # DeepSeek-R1's headline setting
  python eval/aime.py --model out --preset opsd                        # OPSD's 12 samples at T=1.0
  python eval/aime.py --model Qwen/Qwen3-1.7B --backend openai --base-url http://localhost:8000/v1
  python eval/aime.py --model out --benchmarks my_set.jsonl --problem-column question
"""


def build_parser(prog: str, description: str, default_benchmarks: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", required=True, help="model folder or Hub id (with --backend openai: the served model name)"
    )
    model.add_argument("--tokenizer", help="tokenizer folder or Hub id, if not the model's")
    model.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "vllm", "transformers", "openai"],
        help="auto: openai if --base-url is given, vLLM if installed with a GPU, else transformers",
    )
    model.add_argument(
        "--base-url", help="OpenAI-compatible API root for --backend openai, e.g. http://localhost:8000/v1"
    )
    model.add_argument("--api-key", help="API key for --base-url (default: $OPENAI_API_KEY)")
    model.add_argument(
        "--batch-size", type=int, help="sequences per generate call (transformers backend; default 8)"
    )

    data = parser.add_argument_group("benchmarks")
    data.add_argument(
        "--benchmarks",
        nargs="+",
        default=list(default_benchmarks),
        help=f"bundled names, local .json/.jsonl/.parquet files or Hub datasets (default: "
        f"{' '.join(default_benchmarks)}); 'aimo' means aimo_aime + aimo_amc",
    )
    data.add_argument(
        "--limit", type=int, help="only the first LIMIT problems of each benchmark (smoke test)"
    )
    data.add_argument("--problem-column", default="problem", help="problem column of a file / Hub dataset")
    data.add_argument("--answer-column", default="answer", help="answer column of a file / Hub dataset")
    data.add_argument("--id-column", help="id column of a file / Hub dataset (default: row numbers)")

    sampling = parser.add_argument_group("sampling (defaults from --preset; explicit flags win)")
    sampling.add_argument(
        "--preset",
        default="r1",
        choices=sorted(PRESETS),
        help="published settings: r1 = n 16, T 0.6, top-p 0.95, 32768 tokens (default)",
    )
    sampling.add_argument("--n", type=int, help="samples per problem")
    sampling.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    sampling.add_argument("--top-p", type=float, help="nucleus sampling")
    sampling.add_argument("--top-k", type=int, help="top-k sampling (off unless set)")
    sampling.add_argument("--max-new-tokens", type=int, help="generation budget per sample")
    sampling.add_argument("--seed", type=int, default=0)

    prompt = parser.add_argument_group("prompt")
    prompt.add_argument(
        "--prompt-template",
        help="user message with {problem} (default: the R1 'reason step by step ... \\boxed{}' instruction)",
    )
    prompt.add_argument("--system-prompt", help="optional system message")
    prompt.add_argument(
        "--no-chat-template", action="store_true", help="plain prompt even if the tokenizer has a template"
    )
    prompt.add_argument(
        "--no-thinking", action="store_true", help="enable_thinking=False in the chat template (Qwen3)"
    )

    grading = parser.add_argument_group("grading and output")
    grading.add_argument(
        "--grading-timeout", type=float, default=5.0, help="seconds per answer (overrun = wrong)"
    )
    grading.add_argument("--grading-workers", type=int, help="grading processes (default: min(4, CPUs))")
    grading.add_argument("--require-boxed", action="store_true", help="an answer without \\boxed{} is wrong")
    grading.add_argument("--output-dir", help="default: eval_results/<model name>")
    grading.add_argument("--no-resume", action="store_true", help="regenerate everything, ignoring the cache")
    grading.add_argument("--plot", action="store_true", help="also write results.png (needs matplotlib)")
    grading.add_argument("--no-progress", action="store_true", help="no progress bar")
    grading.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="put the results in the model card (model-index) of REPO_ID on the Hub",
    )
    return parser


_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


def check_arguments(parser: argparse.ArgumentParser, args) -> None:
    """Mistakes that can be known from the arguments alone exit 2 here, before a model or a benchmark loads."""
    for flag, value, ok, rule in (
        ("--n", args.n, lambda v: v >= 1, ">= 1"),
        ("--max-new-tokens", args.max_new_tokens, lambda v: v >= 1, ">= 1"),
        ("--temperature", args.temperature, lambda v: v >= 0, ">= 0 (0 = greedy)"),
        ("--top-p", args.top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
        ("--batch-size", args.batch_size, lambda v: v >= 1, ">= 1"),
    ):
        if value is not None and not ok(value):
            parser.error(f"{flag} {value}: must be {rule}.")
    _check_benchmark_names(parser, args.benchmarks)
    if args.backend != "openai" and not args.base_url:
        _check_model_path(parser, args.model)


def _check_benchmark_names(parser, names) -> None:
    import difflib

    from trl_opd.eval.benchmarks import BENCHMARKS

    known = [*BENCHMARKS, "aimo"]
    for name in names:
        if name in known or Path(name).exists():
            continue
        if name.endswith(_DATA_SUFFIXES):
            parser.error(f"--benchmarks {name}: no such file.")
        if "/" not in name:  # not a file and not a Hub dataset id (owner/name)
            near = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            parser.error(f"--benchmarks {name}: unknown benchmark.{hint} The bundled ones are {', '.join(known)}; "
                         f"or give a {'/'.join(_DATA_SUFFIXES)} file or a Hub dataset id (owner/name).")


def _check_model_path(parser, model: str) -> None:
    path = Path(model).expanduser()
    local = model.startswith(("/", ".", "~")) or model.count("/") >= 2
    if not path.exists():
        if local:
            parser.error(f"--model {model}: no such directory (a local model folder, or a Hub id like owner/name).")
        return
    if path.is_dir() and not (path / "config.json").is_file():
        checkpoints = sorted(path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
                             if p.name.split("-")[-1].isdigit() else -1)
        hint = f" Pass a checkpoint, e.g. --model {checkpoints[-1]}." if checkpoints else ""
        parser.error(f"--model {model}: a directory without config.json, not a model folder.{hint}")


def _benchmarks(args) -> dict:
    """``{label: dataset}`` for ``--benchmarks`` ("aimo" expands to both AIMO sets; files are labelled by stem)."""
    from trl_opd.eval.benchmarks import BENCHMARKS, load_benchmark

    names = []
    for name in args.benchmarks:
        names += ["aimo_aime", "aimo_amc"] if name == "aimo" else [name]
    columns = dict(
        problem_column=args.problem_column, answer_column=args.answer_column, id_column=args.id_column
    )
    resolved = {}
    for name in dict.fromkeys(names):
        if name in BENCHMARKS:
            resolved[name] = load_benchmark(name)
        else:  # a local file (labelled by its stem) or a Hub dataset, with the given columns
            resolved[Path(name).stem if Path(name).suffix else name] = load_benchmark(name, **columns)
    return resolved


def _sampling(args) -> dict:
    chosen = dict(PRESETS[args.preset])
    for key in ("n", "temperature", "top_p", "top_k", "max_new_tokens"):
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    if args.no_thinking:
        chosen["enable_thinking"] = False
    return chosen


def main(
    argv: Sequence[str] | None = None, *, prog: str, description: str, default_benchmarks: Sequence[str]
) -> int:
    parser = build_parser(prog, description, default_benchmarks)
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    from trl_opd.eval.prompts import DEFAULT_PROMPT_TEMPLATE
    from trl_opd.eval.report import markdown_table
    from trl_opd.eval.runner import evaluate_math

    output_dir = Path(args.output_dir or Path("eval_results") / Path(args.model.rstrip("/")).name)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    summary = evaluate_math(
        args.model,
        _benchmarks(args),
        **_sampling(args),
        backend=args.backend,
        output_dir=output_dir,
        tokenizer=tokenizer,
        prompt_template=args.prompt_template or DEFAULT_PROMPT_TEMPLATE,
        system_prompt=args.system_prompt,
        use_chat_template=False if args.no_chat_template else None,
        seed=args.seed,
        batch_size=args.batch_size,
        limit=args.limit,
        grading_timeout=args.grading_timeout,
        grading_workers=args.grading_workers,
        require_boxed=args.require_boxed,
        base_url=args.base_url,
        api_key=args.api_key,
        resume=not args.no_resume,
        plot=args.plot,
        progress=not args.no_progress,
    )
    print(markdown_table(summary))
    print(f"Results written to {output_dir}/ (summary.json, results.md, samples/).")
    if args.push_to_hub:
        from trl_opd.eval.hub import push_to_hub, write_model_card

        model_folder = Path(args.model)
        write_model_card(
            output_dir,
            summary,
            model_name=args.push_to_hub,
            existing_card=model_folder / "README.md" if model_folder.is_dir() else None,
        )
        url = push_to_hub(output_dir, args.push_to_hub, only_card=True, token=os.environ.get("HF_TOKEN"))
        print(f"Model card updated: {url}")
    return 0
