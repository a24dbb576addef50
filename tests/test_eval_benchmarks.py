"""Bundled benchmarks, local files and Hub names, normalised to id / problem / answer."""

import hashlib
import json

import datasets
import pytest

from trl_opd.eval.benchmarks import BENCHMARKS, DATA_DIR, list_benchmarks, load_benchmark

EXPECTED_ROWS = {
    "aime24": 30,
    "aime25": 30,
    "aimo_aime": 89,
    "aimo_amc": 83,
    "amc23": 40,
    "math500": 500,
    "gsm8k": 1319,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_bundled_benchmark_schema_and_size(name):
    dataset = load_benchmark(name)
    assert dataset.column_names == ["id", "problem", "answer"]
    assert len(dataset) == EXPECTED_ROWS[name] == BENCHMARKS[name].rows
    assert len(set(dataset["id"])) == len(dataset)
    assert all(problem.strip() for problem in dataset["problem"])
    assert all(answer.strip() for answer in dataset["answer"])


@pytest.mark.parametrize("name", ["aime24", "aime25", "aimo_aime", "aimo_amc", "amc23", "gsm8k"])
def test_integer_answer_benchmarks_have_canonical_integers(name):
    for answer in load_benchmark(name)["answer"]:
        assert answer.lstrip("-").isdigit() and (answer == "0" or not answer.lstrip("-").startswith("0")), (
            answer
        )


def test_known_answers():
    aime24 = dict(zip(*load_benchmark("aime24").select_columns(["id", "answer"]).to_dict().values()))
    assert aime24["2024-I-1"] == "204" and aime24["2024-I-2"] == "25" and aime24["2024-II-15"] == "315"
    aime25 = load_benchmark("aime25")
    assert aime25["answer"][:3] == ["70", "588", "16"] and aime25["id"][0] == "2025-I-1"
    assert load_benchmark("aimo_amc")["answer"][0] == "142"


def test_aimo_aime_is_aime_2022_to_2024_without_2023_i_15():
    ids = load_benchmark("aimo_aime")["id"]
    years = [identifier.split("-")[0] for identifier in ids]
    assert (years.count("2022"), years.count("2023"), years.count("2024")) == (30, 29, 30)
    assert "2023-I-15" not in ids
    assert ids[-30:] == load_benchmark("aime24")["id"]
    assert "89 of its 90" in list_benchmarks()["aimo_aime"]
    assert "89 of its 90" in load_benchmark.__doc__


def test_bundled_files_are_the_attributed_copies():
    attribution = (DATA_DIR / "ATTRIBUTION.md").read_text()
    for path in sorted(DATA_DIR.glob("*/test.jsonl")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        assert f"`{path.parent.name}/test.jsonl`" in attribution and digest in attribution, path


def test_aimo_alone_is_refused():
    with pytest.raises(ValueError, match="ambiguous"):
        load_benchmark("aimo")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_local_files_with_custom_columns(tmp_path, suffix):
    rows = [{"question": "1+1?", "final": 2.0, "key": "a"}, {"question": "2+2?", "final": 4.5, "key": "b"}]
    path = tmp_path / f"set{suffix}"
    if suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("\n".join(json.dumps(row) for row in rows))
    dataset = load_benchmark("mine", path, problem_column="question", answer_column="final", id_column="key")
    assert dataset.to_list() == [
        {"id": "a", "problem": "1+1?", "answer": "2"},
        {"id": "b", "problem": "2+2?", "answer": "4.5"},
    ]
    by_name = load_benchmark(str(path), problem_column="question", answer_column="final")
    assert by_name["id"] == ["0", "1"]


def test_local_file_with_wrong_columns_names_the_fix(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match="problem_column"):
        load_benchmark(str(path))
    with pytest.raises(ValueError, match="does not exist"):
        load_benchmark(str(tmp_path / "missing.jsonl"))


def test_hub_names_fail_offline_with_a_clear_error():
    with pytest.raises(ValueError, match="Offline\\?.*path="):
        load_benchmark("someone/not-a-cached-dataset")
