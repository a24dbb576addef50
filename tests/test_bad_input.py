"""Bad input gets a clear ValueError before any model is loaded or any generation starts."""

import pytest
from datasets import Dataset

import trl.trainer.distillation_trainer as distillation_module
from tiny import cpu_args, prompt_dataset, save_tiny, tiny_tokenizer
from trl_opd import OPDConfig, OPDTrainer
from trl_opd.trainers import opd_trainer as opd_module


def config(tmp_path, **overrides):
    return OPDConfig(output_dir=str(tmp_path), **cpu_args(**overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"divergence": "kl"}, "Unknown `divergence`='kl'"),
        ({"estimator": "k9"}, "Unknown `estimator`='k9'"),
        ({"loss_reduction": "mean"}, "Unknown `loss_reduction`"),
        ({"loss_top_k_source": "both"}, "Unknown `loss_top_k_source`"),
        ({"loss_top_k": 0}, "`loss_top_k` must be >= 1"),
        ({"temperature": 0.0}, "`temperature` must be > 0"),
        ({"distillation_temperature": -1.0}, "`distillation_temperature` must be > 0"),
        ({"divergence": "jsd", "beta": 1.5}, "`beta` must be in [0, 1]"),
        ({"alpha": -0.1}, "`alpha` must be in [0, 1]"),
        ({"lmbda": 2.0}, "`lmbda` must be in [0, 1]"),
        ({"clip": 0.0}, "`clip` must be > 0"),
        ({"estimator": "k2", "divergence": "forward_kl"}, "set divergence='reverse_kl'"),
        ({"estimator": "sampled_pg", "loss_top_k": 4}, "uses only the sampled token"),
    ],
)
def test_config_rejects(tmp_path, overrides, message):
    with pytest.raises(ValueError) as error:
        config(tmp_path, **overrides)
    assert message in str(error.value)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if anything tries to load weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(distillation_module, "create_model_from_path", refuse)
    monkeypatch.setattr(opd_module, "create_model_from_path", refuse)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tokenizer = tiny_tokenizer()
    other_tokenizer = tiny_tokenizer(["completely different words here"] * 20, vocab_size=300)
    other_tokenizer.add_tokens([f"<extra_{i}>" for i in range(7)])
    return {
        "student": save_tiny(root / "student", tokenizer),
        "teacher": save_tiny(root / "teacher", tokenizer, hidden=48, seed=1),
        "other_vocab": save_tiny(root / "other", other_tokenizer, hidden=48, seed=2),
    }


def test_teacher_with_another_vocabulary_points_to_simct(tmp_path, model_dirs, no_model_loading):
    with pytest.raises(ValueError, match="SimCTTrainer"):
        OPDTrainer(model_dirs["student"], model_dirs["other_vocab"], args=config(tmp_path),
                   train_dataset=prompt_dataset())


def test_dataset_without_prompt_column(tmp_path, model_dirs, no_model_loading):
    data = Dataset.from_dict({"question": ["Compute 1+1."]})
    with pytest.raises(ValueError, match="no 'prompt' column"):
        OPDTrainer(model_dirs["student"], model_dirs["teacher"], args=config(tmp_path), train_dataset=data)


def test_eval_dataset_without_prompt_column(tmp_path, model_dirs, no_model_loading):
    data = Dataset.from_dict({"text": ["Compute 1+1."]})
    with pytest.raises(ValueError, match=r"`eval_dataset` has no 'prompt' column"):
        OPDTrainer(model_dirs["student"], model_dirs["teacher"], args=config(tmp_path),
                   train_dataset=prompt_dataset(), eval_dataset=data)


def test_empty_dataset(tmp_path, model_dirs, no_model_loading):
    with pytest.raises(ValueError, match="empty"):
        OPDTrainer(model_dirs["student"], model_dirs["teacher"], args=config(tmp_path),
                   train_dataset=Dataset.from_dict({"prompt": []}))


def test_off_policy_mix_without_completions(tmp_path, model_dirs, no_model_loading):
    with pytest.raises(ValueError, match="'completion' column"):
        OPDTrainer(model_dirs["student"], model_dirs["teacher"], args=config(tmp_path, lmbda=0.5),
                   train_dataset=prompt_dataset(with_completion=False))


def test_missing_teacher(tmp_path, model_dirs, no_model_loading):
    with pytest.raises(ValueError, match="needs a teacher"):
        OPDTrainer(model_dirs["student"], args=config(tmp_path), train_dataset=prompt_dataset())


def test_wrong_config_class(tmp_path, model_dirs, no_model_loading):
    from trl import DistillationConfig

    with pytest.raises(TypeError, match="needs an OPDConfig"):
        OPDTrainer(model_dirs["student"], model_dirs["teacher"], train_dataset=prompt_dataset(),
                   args=DistillationConfig(output_dir=str(tmp_path), **cpu_args()))
