"""Model cards with model-index results, and the (mocked) push to the Hub."""

import json
import math
from unittest import mock

import pytest
from huggingface_hub import ModelCard

from trl_opd.eval.hub import CARD_FILE, RESULTS_FILE, eval_results, push_to_hub, write_model_card


def summary(aime24_avg=0.4, n=16):
    return {
        "model": "out/checkpoint-100",
        "backend": "vllm",
        "settings": {"n": n, "temperature": 0.6, "top_p": 0.95, "top_k": None, "max_new_tokens": 32768},
        "benchmarks": {
            "aime24": {
                f"avg@{n}": aime24_avg,
                f"avg@{n}_stderr": 0.05,
                f"pass@{n}": 0.7,
                f"pass@{n}_stderr": 0.08,
                f"maj@{n}": 0.5,
                f"maj@{n}_stderr": 0.09,
                "num_problems": 30,
                "n": n,
                "grading_timeouts": 1,
                "grading_errors": 0,
                "no_answer_fraction": 0.1,
                "truncated_fraction": 0.05,
                "mean_completion_tokens": 9000.0,
            },
            "my_set": {
                f"avg@{n}": 0.25,
                f"avg@{n}_stderr": math.nan,
                f"maj@{n}": 0.0,
                f"maj@{n}_stderr": math.nan,
                "num_problems": 1,
                "n": n,
                "grading_timeouts": 0,
                "grading_errors": 0,
                "no_answer_fraction": 0.0,
                "truncated_fraction": 0.0,
                "mean_completion_tokens": 10.0,
            },
        },
    }


def test_eval_results_carry_datasets_metrics_and_settings():
    results = {(r.dataset_type, r.metric_type): r for r in eval_results(summary())}
    aime = results[("HuggingFaceH4/aime_2024", "avg@16")]
    assert aime.metric_value == 40.0 and aime.dataset_name == "AIME 2024" and aime.dataset_split == "train"
    assert aime.metric_args == {
        "n": 16,
        "temperature": 0.6,
        "top_p": 0.95,
        "max_new_tokens": 32768,
        "stderr": 5.0,
    }
    assert results[("HuggingFaceH4/aime_2024", "maj@16")].metric_value == 50.0
    assert "stderr" not in results[("my_set", "avg@16")].metric_args  # NaN (one problem) is left out
    assert len(results) == 5


def test_written_card_parses_and_carries_the_results(tmp_path):
    card = write_model_card(
        tmp_path, summary(), model_name="me/distilled", base_model="Qwen/Qwen3-1.7B", license="apache-2.0"
    )
    loaded = ModelCard.load(tmp_path / CARD_FILE)
    assert loaded.data.model_name == "me/distilled" and loaded.data.base_model == "Qwen/Qwen3-1.7B"
    assert "trl-opd" in loaded.data.tags
    values = {(r.dataset_type, r.metric_type): r.metric_value for r in loaded.data.eval_results}
    assert values[("HuggingFaceH4/aime_2024", "avg@16")] == 40.0
    assert values[("HuggingFaceH4/aime_2024", "pass@16")] == 70.0
    assert values[("my_set", "maj@16")] == 0.0
    assert "| aime24 | 30 | 40.0 ± 5.0 |" in loaded.text
    assert card.content == loaded.content
    stored = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert (
        stored["benchmarks"]["aime24"]["avg@16"] == 0.4
        and stored["benchmarks"]["my_set"]["avg@16_stderr"] is None
    )


def test_rewriting_keeps_the_existing_card_and_replaces_old_results(tmp_path):
    (tmp_path / CARD_FILE).write_text(
        "---\nlicense: mit\ntags:\n- trl\n---\n\n# My model\n\nTrained with TRL.\n"
    )
    write_model_card(tmp_path, summary(aime24_avg=0.4))
    write_model_card(tmp_path, summary(aime24_avg=0.6))
    loaded = ModelCard.load(tmp_path / CARD_FILE)
    assert loaded.data.license == "mit" and loaded.data.tags == ["trl", "trl-opd"]
    assert "Trained with TRL." in loaded.text and loaded.text.count("## Evaluation results") == 1
    aime = [
        r
        for r in loaded.data.eval_results
        if r.dataset_type.endswith("aime_2024") and r.metric_type == "avg@16"
    ]
    assert [r.metric_value for r in aime] == [60.0]
    write_model_card(tmp_path, summary(n=4))  # other metrics are added next to the earlier ones
    metric_types = {r.metric_type for r in ModelCard.load(tmp_path / CARD_FILE).data.eval_results}
    assert {"avg@16", "avg@4"} <= metric_types


def test_push_uploads_the_folder_with_the_right_arguments(tmp_path):
    write_model_card(tmp_path, summary())
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    api = mock.MagicMock()
    api.upload_folder.return_value = mock.Mock(commit_url="https://huggingface.co/me/m/commit/abc")
    url = push_to_hub(tmp_path, "me/m", private=True, api=api)
    assert url == "https://huggingface.co/me/m/commit/abc"
    api.create_repo.assert_called_once_with("me/m", private=True, exist_ok=True, repo_type="model")
    api.upload_folder.assert_called_once_with(
        repo_id="me/m",
        folder_path=str(tmp_path),
        repo_type="model",
        commit_message="Upload model and evaluation results",
        create_pr=False,
        allow_patterns=None,
    )


def test_push_only_the_card_builds_its_client_from_the_token(tmp_path):
    write_model_card(tmp_path, summary())
    with mock.patch("trl_opd.eval.hub.HfApi") as client_class:
        push_to_hub(tmp_path, "me/m", token="hf_x", only_card=True, commit_message="results", create_pr=True)
    client_class.assert_called_once_with(token="hf_x")
    upload = client_class.return_value.upload_folder
    assert upload.call_args.kwargs["allow_patterns"] == [CARD_FILE, RESULTS_FILE]
    assert (
        upload.call_args.kwargs["commit_message"] == "results"
        and upload.call_args.kwargs["create_pr"] is True
    )


def test_push_without_a_card_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="write_model_card"):
        push_to_hub(tmp_path, "me/m", api=mock.MagicMock())
