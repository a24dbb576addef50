"""`trl-opd`: the command line of trl_opd, shaped like TRL's (`trl sft --config x.yaml`).

    trl-opd opd --config recipes/toy/opd.yaml                        # in this process (one process)
    trl-opd opd --config recipes/opd.yaml --divergence forward_kl    # any YAML key as a flag; the flag wins
    trl-opd opd --config recipes/opd.yaml --accelerate_config zero2 --num_processes 8   # through accelerate launch
    trl-opd eval --model outputs/opd-qwen3-1.7b --benchmarks aime24
    trl-opd serve-teacher Qwen/Qwen3-8B --port 8010                  # a teacher over HTTP (trl_opd[serve])

A training command parses `--config file.yaml` plus flags with `trl.TrlParser` (the recipes' `parse_recipe_args`:
unknown keys are errors) and runs `main` of `trl_opd/scripts/<method>.py`, the lines `recipes/<method>.py` runs.

Launching differs from TRL's in one way: `trl sft` always re-runs itself under `accelerate launch` (so accelerate's
default config, if you wrote one, applies), while `trl-opd` runs in this process unless the command line has a
launcher option: `--accelerate_config NAME|FILE` (TRL's bundled configs by name, `ddp` being TRL's `multi_gpu`) or any
`accelerate launch` option (`--num_processes 8`, `--config_file my.yaml`, `--multi_gpu`, ...). Then it runs
`accelerate launch <launcher options> -m trl_opd.cli <command> <the other arguments>`, as TRL does; a launcher option
that is also a field of the configs (`--gradient_accumulation_steps`, `--debug`) is the field, as in TRL. The YAML
holds only config fields (TRL also reads launcher keys from it; here they are unknown keys). `--print_command` prints
the command that would run and exits.

Only the standard library is imported before a command is chosen, so bad input (an unknown command, a missing YAML,
an unknown accelerate config name) is reported before torch loads.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Training:
    module: str  # trl_opd.scripts.<module>: ARGUMENTS and main
    help: str
    example: str  # a YAML of recipes/ for this command


TRAINING = {
    "opd": Training("opd", "on-policy distillation, OPDTrainer (OPD, TIP, OPRD, OPSD, PW-OPSD, EDGE-OPD: the YAML "
                    "picks the method)", "recipes/opd.yaml"),
    "tip": Training("opd", "TIP: `opd` with token selection (the same command under TIP's name)", "recipes/tip.yaml"),
    "oprd": Training("opd", "OPRD: `opd` with a representation loss (the same command under OPRD's name)",
                     "recipes/oprd.yaml"),
    "opsd": Training("opd", "OPSD, PW-OPSD, EDGE-OPD: `opd` with the student as its own teacher (the same command)",
                     "recipes/opsd.yaml"),
    "simct": Training("simct", "cross-tokenizer on-policy distillation, SimCTTrainer", "recipes/simct.yaml"),
    "rlad": Training("rlad", "trust-region ratio distillation inside GRPO, RLADTrainer", "recipes/rlad.yaml"),
    "cold-start": Training("cold_start", "off-policy cold start (SFT on filtered teacher answers), then OPD",
                           "recipes/toy/cold_start.yaml"),
}
EVAL_HELP = "evaluate a model on math benchmarks: avg@n, pass@k, maj@n (default AIME 2024 + 2025)"
SERVE_HELP = "serve a teacher model over HTTP to training processes: hidden states, log-probs, its LM head"
COMMANDS = [*TRAINING, "eval", "serve-teacher"]

ACCELERATE_CONFIG_ALIASES = {"ddp": "multi_gpu"}  # the name for TRL's plain data-parallel file

_EPILOG = """\
examples:
  trl-opd opd --config recipes/toy/opd.yaml                         offline toy, CPU, minutes
  trl-opd opd --config recipes/opd.yaml --divergence forward_kl     any YAML key as a flag; the flag wins
  trl-opd tip --config recipes/tip.yaml --dry_run true              validate a YAML, load nothing
  trl-opd opd --config recipes/opd.yaml --accelerate_config zero2 --num_processes 8
  trl-opd eval --model outputs/opd-qwen3-1.7b --benchmarks aime24 --n 64
  trl-opd serve-teacher Qwen/Qwen3-8B --port 8010                   a teacher too large to sit beside the student

`trl-opd COMMAND --help` lists the command's YAML keys (the config fields) and the launcher options.
--accelerate_config NAME|FILE: ddp, zero1, zero2, zero3, fsdp1, fsdp2, single_gpu, multi_gpu (the files TRL ships,
in trl/accelerate_configs/; ddp = multi_gpu) or an accelerate config file; any `accelerate launch` option
(--num_processes, --config_file, ...) also launches through accelerate. Without one the run is in this process."""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-opd",
        description="On-policy distillation for TRL: train with a recipe YAML, evaluate a model.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, training in TRAINING.items():
        commands.add_parser(name, help=training.help, add_help=False)
    commands.add_parser("eval", help=EVAL_HELP, add_help=False)
    commands.add_parser("serve-teacher", help=SERVE_HELP, add_help=False)
    return parser


def _fail(prog: str, message: str) -> None:
    arguments = "COMMAND [ARGUMENTS ...]" if prog == "trl-opd" else "--config FILE.yaml [--KEY VALUE ...]"
    print(f"usage: {prog} {arguments} (see `{prog} --help`)", file=sys.stderr)
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    """Run `trl-opd COMMAND ...` (`argv`: the arguments after `trl-opd`, default `sys.argv[1:]`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" Did you mean `trl-opd {close[0]}`?" if close else ""
        what = f"{command} before the command (the command comes first)" if command.startswith("-") else \
            f"unknown command {command!r}"
        _fail("trl-opd", f"{what}.{hint} The commands are {', '.join(COMMANDS)}, e.g. "
                         "`trl-opd opd --config recipes/toy/opd.yaml` (`trl-opd --help`).")
    if command == "eval":
        return run_eval(rest)
    if command == "serve-teacher":
        return run_serve_teacher(rest)
    return run_training(command, rest)


def run_eval(argv: list[str]) -> int:
    """`trl-opd eval ...`: the evaluator of `eval/aime.py` (`trl_opd.eval.cli`), AIME 2024 + 2025 by default."""
    from trl_opd.eval.cli import main as evaluate

    description = (
        "Evaluate a model on math benchmarks, bundled offline (default: AIME 2024 and AIME 2025; `--benchmarks aimo`"
        " for the AIMO validation sets, or files / Hub datasets). Samples --n completions per problem, grades them"
        " and reports avg@n, pass@k and maj@n. Same options as eval/aime.py."
    )
    return evaluate(argv, prog="trl-opd eval", description=description, default_benchmarks=["aime24", "aime25"])


def _serve_teacher_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-opd serve-teacher",
        description="Serve a teacher model over HTTP (trl_opd.serving.teacher_server) for training processes that "
                    "cannot hold it: its last hidden states, decoder-layer outputs, log-probs at any token ids, "
                    "top-k log-probs and its LM head. Requests arriving together share a forward.",
        epilog="example:\n  trl-opd serve-teacher Qwen/Qwen3-8B --port 8010 --dtype bfloat16\n"
               "the training side: trl_opd.serving.trl_opd_client.TrlOpdTeacherClient(\"http://127.0.0.1:8010\")",
        formatter_class=_Formatter,
        allow_abbrev=False,
    )
    parser.add_argument("model", metavar="MODEL",
                        help="a model directory or Hub name (AutoModelForCausalLM, trust_remote_code=False)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address to listen on; 0.0.0.0 serves other machines (no authentication: use it "
                             "on a trusted network only)")
    parser.add_argument("--port", type=int, default=8010, help="the port to listen on")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], default="auto",
                        help="the dtype the model is loaded in (auto: the checkpoint's)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...; None: cuda if available, else cpu")
    parser.add_argument("--max_batch_size", type=int, default=8,
                        help="the most waiting requests the server takes at once (requests that can share a forward "
                             "are merged into one)")
    parser.add_argument("--batch_wait_ms", type=float, default=5.0,
                        help="after a request arrives, how long the server waits for more to batch with it")
    return parser


def run_serve_teacher(argv: list[str]) -> int:
    """`trl-opd serve-teacher MODEL ...`: load the model and serve it until interrupted (needs trl_opd[serve])."""
    parser = _serve_teacher_parser()
    args = parser.parse_args(argv)
    if args.max_batch_size < 1 or args.batch_wait_ms < 0:
        parser.error(f"--max_batch_size {args.max_batch_size} must be >= 1 and --batch_wait_ms "
                     f"{args.batch_wait_ms:g} >= 0.")
    missing = [name for name in ("starlette", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(f"the teacher server needs {' and '.join(missing)}: pip install \"trl_opd[serve]\"")
    from trl_opd.serving.teacher_server import serve

    serve(args.model, host=args.host, port=args.port, dtype=args.dtype, device=args.device,
          max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms)
    return 0


# ------------------------------------------------------------------------------------------------- training


def accelerate_config_names() -> dict[str, Path]:
    """The accelerate configs `--accelerate_config` knows by name: TRL's bundled files, plus `ddp` (= multi_gpu)."""
    spec = importlib.util.find_spec("trl")
    folder = Path(spec.submodule_search_locations[0] if spec else importlib.import_module("trl").__path__[0])
    files = {path.stem: path for path in sorted((folder / "accelerate_configs").glob("*.yaml"))}
    names = {alias: files[target] for alias, target in ACCELERATE_CONFIG_ALIASES.items() if target in files}
    return {**names, **files}


def resolve_accelerate_config(value: str, prog: str = "trl-opd") -> str:
    """The accelerate config file `--accelerate_config value` names: an existing file, or a bundled name."""
    if Path(value).is_file():
        return value
    names = accelerate_config_names()
    if value in names:
        return str(names[value])
    kind = "no such file" if Path(value).suffix in (".yaml", ".yml", ".json") else "unknown name"
    _fail(prog, f"--accelerate_config {value!r}: {kind}. Name one of {', '.join(names)} (TRL's bundled files; ddp = "
                "multi_gpu) or give the path of an accelerate config file (`accelerate config --config_file "
                "my.yaml` writes one).")


@dataclass
class _Split:
    script: list[str]  # the arguments of the recipe (its TrlParser)
    launch: list[str]  # the arguments of `accelerate launch`
    accelerate_config: str | None = None
    print_command: bool = False


def _accelerate_options() -> dict[str, argparse.Action]:
    from accelerate.commands.launch import launch_command_parser

    return {
        option: action
        for action in launch_command_parser()._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


def _split(argv: list[str], own: set[str], prog: str) -> _Split:
    """Sort the command line into the recipe's arguments and `accelerate launch`'s (TRL's rule: a flag the recipe's
    dataclasses know is theirs; any other `accelerate launch` flag is the launcher's; anything else is an error)."""
    accelerate = _accelerate_options()
    split = _Split(script=[], launch=[])
    index = 0
    while index < len(argv):
        token = argv[index]
        name, has_value = token.split("=", 1)[0], "=" in token
        if not token.startswith("--") or name in own:
            split.script.append(token)  # a flag of the recipe, or the value of the flag before it
        elif name == "--print_command":
            split.print_command = True
        elif name == "--accelerate_config":
            if not has_value and index + 1 >= len(argv):
                _fail(prog, "--accelerate_config needs a value: a name (ddp, zero2, zero3, fsdp2, ...) or a file.")
            split.accelerate_config = token.split("=", 1)[1] if has_value else argv[index + 1]
            index += 0 if has_value else 1
        elif name in accelerate:
            split.launch.append(token)
            if not has_value and accelerate[name].nargs != 0 and index + 1 < len(argv):
                index += 1
                split.launch.append(argv[index])
        else:
            close = difflib.get_close_matches(name, [*own, *accelerate], n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            _fail(prog, f"unknown option {name}: neither a config field nor an `accelerate launch` option.{hint} "
                        f"`{prog} --help` lists the fields.")
        index += 1
    return split


def _check_config_file(argv: list[str], training: Training, prog: str) -> list[str]:
    """`--config FILE` exists (and `--config=FILE` becomes `--config FILE`, the form TrlParser reads)."""
    argv = [part for token in argv for part in (token.split("=", 1) if token.startswith("--config=") else [token])]
    if "--config" in argv:
        position = argv.index("--config")
        if position + 1 >= len(argv):
            _fail(prog, f"--config needs a YAML file, e.g. `{prog} --config {training.example}`.")
        path = argv[position + 1]
        if not Path(path).is_file():
            _fail(prog, f"--config {path}: no such file. The recipes' YAMLs are recipes/*.yaml (real models) and "
                        f"recipes/toy/*.yaml (offline toy), e.g. `{prog} --config {training.example}`.")
    return argv


def _help(parser, training: Training) -> None:
    parser.description = f"{training.help}.\nYAML keys (--config FILE.yaml) and flags are the fields below; a flag " \
                         "overrides the YAML."
    example = f"{parser.prog} --config {training.example}"
    parser.epilog = (f"examples:\n  {example} --dry_run true    validate, load nothing\n"
                     f"  {example} --accelerate_config zero2 --num_processes 8")
    parser.formatter_class = _Formatter
    launcher = parser.add_argument_group("launcher (trl-opd; command line only, not YAML keys)")
    launcher.add_argument("--accelerate_config", metavar="NAME|FILE",
                          help="run through `accelerate launch --config_file FILE`: ddp, zero1, zero2, zero3, fsdp1, "
                               "fsdp2, single_gpu, multi_gpu or a file. Any other `accelerate launch` option "
                               "(--num_processes N, --config_file FILE, --multi_gpu, ...) also launches through it")
    launcher.add_argument("--print_command", action="store_true",
                          help="print the command that would run (e.g. the `accelerate launch ...` line) and exit")
    parser.print_help()


def _accelerate_executable() -> list[str]:
    beside = Path(sys.executable).with_name("accelerate")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "accelerate.commands.accelerate_cli"]


def run_training(command: str, argv: list[str]) -> int:
    """`trl-opd <training command> ...`: parse, then run in this process or relaunch through `accelerate launch`."""
    training, prog = TRAINING[command], f"trl-opd {command}"
    help_wanted = "-h" in argv or "--help" in argv
    if not help_wanted:  # the files named exist, before torch loads
        argv = _check_config_file(argv, training, prog)
        for position, token in enumerate(argv):
            if token.startswith("--accelerate_config=") or token == "--accelerate_config" and position + 1 < len(argv):
                resolve_accelerate_config(token.split("=", 1)[1] if "=" in token else argv[position + 1], prog)
    from trl_opd.recipes import parse_recipe_args, recipe_parser

    module = importlib.import_module(f"trl_opd.scripts.{training.module}")
    arguments = module.ARGUMENTS
    parser = recipe_parser(*arguments, prog=prog)
    if help_wanted:
        _help(parser, training)
        return 0
    own = {option for action in parser._actions for option in action.option_strings} | {"--config"}
    split = _split(argv, own, prog)
    if split.accelerate_config is not None:
        if any(token.split("=", 1)[0] == "--config_file" for token in split.launch):
            _fail(prog, "give --accelerate_config or accelerate's --config_file, not both.")
        split.launch = ["--config_file", resolve_accelerate_config(split.accelerate_config, prog), *split.launch]

    if split.launch:  # validate here (a bad value fails once, before N processes start), then relaunch
        parse_recipe_args(*arguments, args=split.script, prog=prog)
        launch = [*_accelerate_executable(), "launch", *split.launch, "-m", "trl_opd.cli", command, *split.script]
        if split.print_command:
            print(shlex.join(launch))
            return 0
        return subprocess.call(launch)
    if split.print_command:  # validated like a run
        parse_recipe_args(*arguments, args=split.script, prog=prog)
        print(shlex.join([sys.executable, "-m", "trl_opd.cli", command, *split.script]))
        return 0
    module.main(*parse_recipe_args(*arguments, args=split.script, prog=prog))
    return 0


if __name__ == "__main__":
    sys.exit(main())
