"""`trl-opd`, the command line (trl_opd/cli.py): help, YAML plus flags, the accelerate launcher, errors, a toy run.

The console script runs as a subprocess where the entry point itself is the thing checked (`--help`, the errors that
must come before torch loads, the 2-step toy run); the rest calls `trl_opd.cli.main` in this process.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_recipes import SMOKE, assert_finite_losses, smoke_cache  # noqa: F401 (smoke_cache is a fixture)

from trl_opd import cli

REPO = Path(__file__).resolve().parents[1]
TRL_OPD = Path(sys.executable).with_name("trl-opd")
TOY_OPD = "recipes/toy/opd.yaml"
FIELD_OF = {"opd": "--divergence", "tip": "--token_selection", "oprd": "--representation_weight",
            "opsd": "--teacher_context_column", "simct": "--cross_tokenizer_loss", "rlad": "--rlad_alpha",
            "cold-start": "--cold_start_num_prompts"}


def trl_opd(*arguments: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(TRL_OPD), *arguments], check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def run_main(*arguments: str) -> int:
    """`trl_opd.cli.main(arguments)` in this process; its exit code (a `SystemExit` counts)."""
    try:
        return cli.main(list(arguments))
    except SystemExit as stopped:
        return stopped.code


def test_console_script_help_lists_every_command():
    assert TRL_OPD.exists(), "reinstall: .venv/bin/pip install --no-deps -e ."
    finished = trl_opd("--help")
    assert finished.returncode == 0, finished.stderr
    for command in cli.COMMANDS:
        assert f"    {command}" in finished.stdout
    assert "--accelerate_config" in finished.stdout


def test_console_script_subcommand_help():
    finished = trl_opd("opd", "--help")
    assert finished.returncode == 0, finished.stderr
    assert "usage: trl-opd opd" in finished.stdout
    for option in ("--divergence", "--testbed", "--model_name_or_path", "--accelerate_config", "--print_command"):
        assert option in finished.stdout


@pytest.mark.parametrize("command", sorted(FIELD_OF))
def test_training_command_help_lists_its_fields(command, capsys):
    assert run_main(command, "--help") == 0
    printed = capsys.readouterr().out
    assert f"usage: trl-opd {command}" in printed
    assert FIELD_OF[command] in printed and "--dry_run" in printed and "--accelerate_config" in printed


def test_eval_help(capsys):
    assert run_main("eval", "--help") == 0
    printed = capsys.readouterr().out
    assert "usage: trl-opd eval" in printed and "--benchmarks" in printed and "aime24 aime25" in printed


def test_a_flag_overrides_the_yaml(capsys):
    assert yaml.safe_load((REPO / TOY_OPD).read_text())["max_steps"] == 500
    code = run_main("opd", "--config", str(REPO / TOY_OPD), "--divergence", "forward_kl", "--max_steps", "7",
                    "--testbed", "smoke", "--dry_run", "true")
    assert code == 0
    printed = capsys.readouterr().out
    assert "'divergence': 'forward_kl'" in printed and "'max_steps': 7" in printed and "'testbed': 'smoke'" in printed


@pytest.mark.parametrize("name, file", [("ddp", "multi_gpu.yaml"), ("zero2", "zero2.yaml"), ("zero3", "zero3.yaml"),
                                        ("fsdp2", "fsdp2.yaml")])
def test_accelerate_config_name_resolves_to_a_launch_command(name, file, capsys):
    code = run_main("opd", "--config", str(REPO / TOY_OPD), "--accelerate_config", name, "--num_processes", "2",
                    "--max_steps", "3", "--gradient_accumulation_steps", "2", "--print_command")
    assert code == 0
    launch = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    config_file = Path(launch[launch.index("--config_file") + 1])
    assert launch[1] == "launch" and config_file.name == file and config_file.is_file()
    # the launcher's options before the module, the recipe's after it (a config field stays the recipe's)
    assert launch[launch.index("--config_file"):launch.index("-m")] == ["--config_file", str(config_file),
                                                                        "--num_processes", "2"]
    assert launch[launch.index("-m"):] == ["-m", "trl_opd.cli", "opd", "--config", str(REPO / TOY_OPD),
                                           "--max_steps", "3", "--gradient_accumulation_steps", "2"]
    if name == "fsdp2":
        settings = yaml.safe_load(config_file.read_text())
        assert settings["distributed_type"] == "FSDP" and settings["fsdp_config"]["fsdp_version"] == 2


def test_accelerate_config_file_and_plain_launcher_options(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    mine = tmp_path / "mine.yaml"
    mine.write_text("distributed_type: MULTI_GPU\nnum_processes: 2\n")
    code = run_main("rlad", "--config", "recipes/toy/rlad.yaml", "--accelerate_config", str(mine), "--print_command")
    assert code == 0
    assert f"launch --config_file {mine} -m trl_opd.cli rlad" in capsys.readouterr().out
    assert run_main("opd", "--config", TOY_OPD, "--multi_gpu", "--num_processes=2", "--print_command") == 0
    assert "launch --multi_gpu --num_processes=2 -m trl_opd.cli opd --config" in capsys.readouterr().out
    assert run_main("opd", "--config", TOY_OPD, "--print_command") == 0  # no launcher option: this process
    assert capsys.readouterr().out.split() == [sys.executable, "-m", "trl_opd.cli", "opd", "--config", TOY_OPD]


@pytest.mark.parametrize("arguments, message", [
    (["opdd"], "unknown command 'opdd'. Did you mean `trl-opd opd`?"),
    (["--config", TOY_OPD], "--config before the command (the command comes first)"),
    (["opd", "--config", "recipes/nope.yaml"], "--config recipes/nope.yaml: no such file. The recipes' YAMLs are"),
    (["opd", "--config", TOY_OPD, "--accelerate_config", "zero4"],
     "--accelerate_config 'zero4': unknown name. Name one of ddp,"),
    (["opd", "--config", TOY_OPD, "--accelerate_config", "mine.yaml"],
     "--accelerate_config 'mine.yaml': no such file"),
])
def test_bad_command_lines_fail_before_torch_loads(arguments, message):
    script = ("import atexit, sys\n"
              "atexit.register(lambda: print('torch imported:', 'torch' in sys.modules))\n"
              "from trl_opd.cli import main\n"
              f"sys.exit(main({arguments!r}))\n")
    finished = subprocess.run([sys.executable, "-c", script], check=False, cwd=REPO, capture_output=True, text=True,
                              timeout=60)
    assert finished.returncode == 2 and message in finished.stderr, finished.stderr
    assert "Traceback" not in finished.stderr and "torch imported: False" in finished.stdout


def test_an_unknown_option_names_the_closest_field(capsys):
    assert run_main("opd", "--config", str(REPO / TOY_OPD), "--divergense", "forward_kl") == 2
    assert "unknown option --divergense" in capsys.readouterr().err


def test_toy_config_trains_two_steps(tmp_path, smoke_cache):  # noqa: F811
    finished = trl_opd("opd", "--config", TOY_OPD, *SMOKE, "--output_dir", str(tmp_path / "out"),
                       TRL_OPD_CACHE=str(smoke_cache))
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-3000:]
    assert "[trl_opd] teacher" in finished.stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {"teacher", "student before", "student after"} <= results.keys()
    assert_finite_losses(tmp_path / "out")
