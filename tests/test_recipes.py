"""The YAML recipes: every YAML validates against the script its header names (`--dry_run`, no model loaded), and
the toy recipes train end to end on the "smoke" testbed pair (seconds) and report teacher / before / after.

Each YAML's header says how to run it (`accelerate launch ... recipes/<script>.py --config recipes/<file>.yaml`); the
tests read the script from there, so the header stays true.
"""

from __future__ import annotations

import json
import math
import re
import runpy
import sys
from pathlib import Path

import pytest

from tiny import launch_two_cpu_processes

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
YAMLS = sorted(RECIPES.glob("*.yaml")) + sorted((RECIPES / "toy").glob("*.yaml"))
LAUNCH = re.compile(r"(recipes/\w+\.py)[\s\\]*(?:#\s*)?--config (recipes/[\w/]+\.yaml)")


def script_of(yaml_path: Path) -> Path:
    """The script the YAML's header comment launches it with (and the header names this very file)."""
    header = "\n".join(line for line in yaml_path.read_text().splitlines() if line.startswith("#"))
    launches = LAUNCH.findall(header.replace("\n#", " "))
    relative = yaml_path.relative_to(REPO).as_posix()
    scripts = [script for script, config in launches if config == relative]
    assert scripts, f"{relative}: the header must show `accelerate launch recipes/<script>.py --config {relative}`"
    return REPO / scripts[0]


def run_recipe(script: Path, *arguments: str, monkeypatch) -> None:
    """Run a recipe script in this process, as `python script arguments...`."""
    monkeypatch.setattr(sys, "argv", [str(script), *arguments])
    runpy.run_path(str(script), run_name="__main__")


@pytest.mark.parametrize("yaml_path", YAMLS, ids=lambda path: path.relative_to(RECIPES).as_posix())
def test_yaml_validates_against_its_script(yaml_path, monkeypatch, capsys):
    cpu = [] if yaml_path.parent.name == "toy" else ["--bf16", "false"]  # the GPU recipes' bf16 fails on a CPU
    with pytest.raises(SystemExit) as stopped:
        run_recipe(script_of(yaml_path), "--config", str(yaml_path), "--dry_run", "true", *cpu,
                   monkeypatch=monkeypatch)
    assert stopped.value.code == 0
    printed = capsys.readouterr().out
    assert "[trl_opd] RecipeArguments:" in printed and "Config: {" in printed


def test_unknown_yaml_key_is_an_error(tmp_path, monkeypatch, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text((RECIPES / "toy" / "tip.yaml").read_text() + "token_ration: 0.3\n")
    with pytest.raises(ValueError, match="token_ration"):
        run_recipe(RECIPES / "tip.py", "--config", str(config), "--dry_run", "true", monkeypatch=monkeypatch)


def test_bad_testbed_student_is_an_error(monkeypatch, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_recipe(RECIPES / "opsd.py", "--config", str(RECIPES / "toy" / "opsd.yaml"), "--testbed_student",
                   "clever", "--dry_run", "true", monkeypatch=monkeypatch)
    assert stopped.value.code != 0
    assert "testbed_student must be" in capsys.readouterr().err


SMOKE = ["--testbed", "smoke", "--testbed_student", "default", "--max_steps", "2", "--per_device_train_batch_size",
         "4", "--testbed_train_size", "64", "--testbed_eval_size", "8", "--logging_steps", "1",
         "--disable_tqdm", "true"]
TOY_RUNS = {
    "opd": [],
    "tip": [],
    "opsd": [],
    "pw_opsd": [],
    "edge_opd": [],
    "oprd": [],
    "rlad": ["--num_generations", "4", "--max_completion_length", "16"],
    "cold_start": ["--cold_start_num_prompts", "8", "--cold_start_generation_batch_size", "8",
                   "--cold_start_require_correct", "false"],
    "simct": ["--testbed", "smoke_bpe_teacher"],  # a BPE teacher and the character-level student
    "served_teacher": [],  # the toy teacher served by `trl-opd serve-teacher`, started and stopped by the recipe
}


@pytest.fixture(scope="module")
def smoke_cache(tmp_path_factory):
    """The smoke testbed pairs, built once for the module (seconds)."""
    from trl_opd.testbed import prepare

    cache = tmp_path_factory.mktemp("testbed-cache")
    for setting in ("smoke", "smoke_bpe_teacher"):
        prepare(setting, cache_dir=cache, show_progress=False)
    return cache


def assert_finite_losses(output_dir: Path) -> None:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses


@pytest.mark.parametrize("name", sorted(TOY_RUNS))
def test_toy_recipe_trains_and_reports(name, tmp_path, smoke_cache, monkeypatch):
    monkeypatch.setenv("TRL_OPD_CACHE", str(smoke_cache))
    yaml_path = RECIPES / "toy" / f"{name}.yaml"
    run_recipe(script_of(yaml_path), "--config", str(yaml_path), *SMOKE, *TOY_RUNS[name],
               "--output_dir", str(tmp_path / "out"), monkeypatch=monkeypatch)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {"teacher", "student before", "student after"} <= results.keys()
    assert all(0.0 <= results[key] <= 1.0 for key in ("teacher", "student before", "student after"))
    assert_finite_losses(tmp_path / "out")


@pytest.mark.multiprocess
def test_toy_recipes_on_two_cpu_processes(tmp_path, smoke_cache):
    """The OPDTrainer (TIP) and SimCTTrainer toy recipes under `accelerate launch --multi_gpu --num_processes 2`
    (use_cpu: gloo; `--cpu --num_processes 2` would start one process without MPI). RLAD's recipe has its own
    2-process test in test_rlad_trainer.py."""
    launch_two_cpu_processes(Path(__file__).with_name("recipes_2proc_run.py"), tmp_path, "tip", "simct", timeout=600,
                             cwd=tmp_path, TRL_OPD_CACHE=str(smoke_cache))
    for name in ("tip", "simct"):
        assert_finite_losses(tmp_path / name)
        assert json.loads((tmp_path / name / "results.json").read_text())["student after"] >= 0.0
