"""Test-wide settings: everything runs offline on the CPU."""

import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRL_EXPERIMENTAL_SILENCE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "CUDA_VISIBLE_DEVICES": "",
    "WANDB_DISABLED": "true",
}.items():
    os.environ.setdefault(_key, _value)


import pytest  # noqa: E402


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if any trainer loads a model: bad input must be reported before that expensive work."""
    import trl.trainer.distillation_trainer as distillation_module

    from trl_opd.trainers import teacher as teacher_module

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(distillation_module, "create_model_from_path", refuse)
    monkeypatch.setattr(teacher_module, "create_model_from_path", refuse)
    monkeypatch.setattr("trl.trainer.grpo_trainer.create_model_from_path", refuse)
