"""Math benchmarks: bundled offline copies, local files and Hugging Face datasets, normalised to one schema.

Every loader returns a ``datasets.Dataset`` with three string columns: ``id``, ``problem`` and ``answer``.
Bundled copies and their sources are listed in ``trl_opd/eval/data/ATTRIBUTION.md``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trl_opd.eval.grading import answer_to_str

DATA_DIR = Path(__file__).resolve().parent / "data"
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class BenchmarkInfo:
    """What a bundled benchmark is, and which Hub dataset it stands for (used in model cards)."""

    title: str
    rows: int
    description: str
    hub_dataset: str
    hub_split: str = "train"
    hub_config: str | None = None


def _read_jsonl(relative_path: str) -> list[dict]:
    with open(DATA_DIR / relative_path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _row(identifier, problem: str, answer) -> dict[str, str]:
    return {"id": str(identifier), "problem": problem, "answer": answer_to_str(answer)}


# AoPS wiki URLs name the contest and problem: ".../2024_AIME_I_Problems/Problem_1" -> id "2024-I-1",
# ".../2022_AMC_12A_Problems/Problem_3" -> id "2022-AMC12A-3"
_AOPS_PROBLEM = re.compile(r"(\d{4})_(?:AIME_(I+)|AMC_(\d+[AB]))_Problems/Problem_(\d+)")


def _aops_id(url: str) -> str:
    year, aime_part, amc_contest, number = _AOPS_PROBLEM.search(url).groups()
    return f"{year}-{aime_part}-{number}" if aime_part else f"{year}-AMC{amc_contest}-{number}"


def _aops_rows(relative_path: str) -> list[dict]:
    return [_row(_aops_id(r["url"]), r["problem"], r["answer_int"]) for r in _read_jsonl(relative_path)]


def _aime24_rows() -> list[dict]:
    return _aops_rows("aime24/test.jsonl")


def _aime25_rows() -> list[dict]:
    return [_row(r["id"], r["problem"], r["answer_int"]) for r in _read_jsonl("aime25/test.jsonl")]


def _aimo_aime_rows() -> list[dict]:
    older = [r for r in _read_jsonl("aime_1983_2024/test.jsonl") if r["year"] in ("2022", "2023")]
    # 2022 II-8 lists "080 or 081 (both were accepted)"; 80 is the official answer and the one graded.
    rows = [
        _row(r["id"], r["problem"], r["answer_int"] if r["answer_int"] is not None else 80) for r in older
    ]
    return rows + _aime24_rows()


def _aimo_amc_rows() -> list[dict]:
    return _aops_rows("aimo_validation_amc/test.jsonl")


def _amc23_rows() -> list[dict]:
    return [_row(r["id"], r["problem"], r["answer"]) for r in _read_jsonl("amc23/test.jsonl")]


def _math500_rows() -> list[dict]:
    return [_row(r["unique_id"], r["problem"], r["answer"]) for r in _read_jsonl("math500/test.jsonl")]


def _gsm8k_rows() -> list[dict]:
    return [_row(index, r["problem"], r["answer"]) for index, r in enumerate(_read_jsonl("gsm8k/test.jsonl"))]


BENCHMARKS: dict[str, BenchmarkInfo] = {
    "aime24": BenchmarkInfo("AIME 2024", 30, "AIME 2024 I + II", "HuggingFaceH4/aime_2024"),
    "aime25": BenchmarkInfo("AIME 2025", 30, "AIME 2025 I + II (MathArena)", "MathArena/aime_2025"),
    "aimo_aime": BenchmarkInfo(
        "AIMO validation AIME",
        89,
        "AI-MO/aimo-validation-aime = AIME 2022-2024; offline sources give 89 of its 90 problems "
        "(AIME 2023 I-15 missing); contains AIME 2024",
        "AI-MO/aimo-validation-aime",
    ),
    "aimo_amc": BenchmarkInfo(
        "AIMO validation AMC", 83, "AI-MO/aimo-validation-amc = AMC 12 2022-2023", "AI-MO/aimo-validation-amc"
    ),
    "amc23": BenchmarkInfo("AMC 2023", 40, "AMC 12 2023 subset (Qwen2.5-Math)", "zwhe99/amc23", "test"),
    "math500": BenchmarkInfo(
        "MATH-500", 500, "MATH-500 (PRM800K test split)", "HuggingFaceH4/MATH-500", "test"
    ),
    "gsm8k": BenchmarkInfo("GSM8K", 1319, "GSM8K test", "openai/gsm8k", "test", "main"),
}

_BUNDLED_ROWS: dict[str, Callable[[], list[dict]]] = {
    "aime24": _aime24_rows,
    "aime25": _aime25_rows,
    "aimo_aime": _aimo_aime_rows,
    "aimo_amc": _aimo_amc_rows,
    "amc23": _amc23_rows,
    "math500": _math500_rows,
    "gsm8k": _gsm8k_rows,
}


def list_benchmarks() -> dict[str, str]:
    """Bundled benchmark names with a one-line description each (row counts included)."""
    return {
        name: f"{info.title}: {info.rows} problems. {info.description}" for name, info in BENCHMARKS.items()
    }


def normalize_dataset(
    dataset,
    *,
    problem_column: str = "problem",
    answer_column: str = "answer",
    id_column: str | None = None,
    source: str = "The dataset",
):
    """``dataset`` rewritten to string columns ``id``, ``problem``, ``answer`` (ids default to row numbers)."""
    missing = [
        column
        for column in (problem_column, answer_column, id_column)
        if column and column not in dataset.column_names
    ]
    if missing:
        raise ValueError(
            f"{source} has no column(s) {missing}; its columns are {dataset.column_names}. "
            "Pass problem_column=/answer_column=/id_column= (CLI: --problem-column/--answer-column)."
        )
    rows = [
        _row(record[id_column] if id_column else index, str(record[problem_column]), record[answer_column])
        for index, record in enumerate(dataset)
    ]
    return _to_dataset(rows)


def _to_dataset(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list(
        rows,
        features=datasets.Features(
            {column: datasets.Value("string") for column in ("id", "problem", "answer")}
        ),
    )


def _load_local(path: Path, split: str | None):
    import datasets

    builder = LOCAL_SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"Cannot read {path}: use a .json, .jsonl or .parquet file.")
    return datasets.load_dataset(builder, data_files=str(path), split=split or "train")


def _load_hub(name: str, subset: str | None, split: str | None):
    import datasets

    try:
        loaded = datasets.load_dataset(name, subset, split=split)
    except Exception as error:
        raise ValueError(
            f"{name!r} is not a bundled benchmark ({', '.join(BENCHMARKS)}) nor a local .json/.jsonl/.parquet "
            f"file, and loading it from the Hugging Face Hub failed ({type(error).__name__}: {error}). "
            "Offline? Download the dataset where the Hub is reachable and pass path=<file>."
        ) from error
    if isinstance(loaded, datasets.DatasetDict):
        if "test" in loaded:
            return loaded["test"]
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise ValueError(f"{name!r} has splits {list(loaded)}; pass split=<one of them>.")
    return loaded


def load_benchmark(
    name: str,
    path: str | Path | None = None,
    *,
    problem_column: str = "problem",
    answer_column: str = "answer",
    id_column: str | None = None,
    split: str | None = None,
    subset: str | None = None,
):
    """Load a math benchmark as a ``datasets.Dataset`` with string columns ``id``, ``problem``, ``answer``.

    Args:
        name: a bundled benchmark (works offline; see :func:`list_benchmarks`):

            - ``aime24``: AIME 2024 (30). ``aime25``: AIME 2025 (30, MathArena).
            - ``aimo_aime``: AI-MO/aimo-validation-aime, AIME 2022–2024. Offline sources give **89 of its 90**
              problems (AIME 2023 I-15 is missing); it contains AIME 2024, so do not pool it with ``aime24``.
            - ``aimo_amc``: AI-MO/aimo-validation-amc, AMC 12 2022–2023 (83). ``amc23``: AMC 2023 subset (40).
            - ``math500``: MATH-500 (500). ``gsm8k``: GSM8K test (1,319).

            Otherwise a path to a local .json/.jsonl/.parquet file, or a Hugging Face dataset name loaded with
            ``datasets.load_dataset`` (needs the Hub or a local cache). "aimo" alone is refused: it is ambiguous.
        path: a local file to load instead; ``name`` is then only a label.
        problem_column, answer_column, id_column: columns of a local or Hub dataset (ids default to row numbers).
        split, subset: the split (local files: "train"; Hub: "test" when there is one) and config of the dataset.
    """
    if path is None and name in _BUNDLED_ROWS:
        return _to_dataset(_BUNDLED_ROWS[name]())
    if path is None and name.lower() == "aimo":
        raise ValueError(
            "'aimo' is ambiguous: use 'aimo_aime' (AI-MO/aimo-validation-aime, AIME 2022-2024) or "
            "'aimo_amc' (AI-MO/aimo-validation-amc, the 83 AMC problems of OPRD's AIMO column)."
        )
    local = Path(path) if path is not None else Path(name)
    if path is not None or local.suffix.lower() in LOCAL_SUFFIXES:
        if not local.is_file():
            raise ValueError(f"Benchmark file {local} does not exist.")
        dataset = _load_local(local, split)
    else:
        dataset = _load_hub(name, subset, split)
    return normalize_dataset(
        dataset,
        problem_column=problem_column,
        answer_column=answer_column,
        id_column=id_column,
        source=str(local if path else name),
    )
