"""Build (or fetch from the cache) the teacher and student of a testbed setting and report on them.

    python -m trl_opd.testbed --setting multistrategy [--seed 0] [--threads 1] [--cache-dir DIR] [--json out.json]

Prints, for each model: its path, whether it came from the cache, steps, training wall time, the
validation history and the accuracy on the 300 held-out problems; in an additions-only setting also
which strategies its held-out answers use.
"""

from __future__ import annotations

import argparse
import json
import time


def _parse_args(argv=None):
    from trl_opd.testbed.training import SETTINGS

    parser = argparse.ArgumentParser(prog="python -m trl_opd.testbed", description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS) + ["all"], default="main")
    parser.add_argument("--seed", type=int, default=0, help="seed of model init and training data")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--cache-dir", default=None, help="default: $TRL_OPD_CACHE or ~/.cache/trl_opd/testbed")
    parser.add_argument("--json", default=None, help="also write the report to this file")
    return parser.parse_args(argv)


def describe(path: str, task, seconds: float) -> dict:
    """Report on a built checkpoint: its metadata, plus the strategy mix of its held-out answers."""
    from trl_opd.testbed.evaluation import accuracy, strategy_summary
    from trl_opd.testbed.task import heldout_problems
    from trl_opd.testbed.training import load_pretrained, read_metadata

    metadata = read_metadata(path)
    report = {
        "path": path,
        "build_or_fetch_s": round(seconds, 1),
        **{
            key: metadata.get(key)
            for key in ("steps", "wall_time_s", "cpu_time_s", "reached_target", "heldout_accuracy", "num_parameters")
        },
        "validation_history": metadata["validation_history"],
    }
    if not task.allow_subtraction:
        model, tokenizer = load_pretrained(path)
        _, records = accuracy(model, tokenizer, heldout_problems(task), return_records=True)
        report["strategies"] = strategy_summary(records)
    return report


def main(argv=None) -> dict:
    args = _parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from trl_opd.testbed.training import SETTINGS, build_model

    names = sorted(SETTINGS) if args.setting == "all" else [args.setting]
    reports = {}
    for name in names:
        setting = SETTINGS[name]
        reports[name] = {"task": setting.task.to_dict()}
        for role in ("teacher", "student"):
            start = time.perf_counter()
            model, training = setting.recipe(role)
            path = build_model(role, setting.task, model, args.seed, args.cache_dir, training)
            reports[name][role] = describe(path, setting.task, time.perf_counter() - start)
            print(f"[{name}] {role}: {json.dumps(reports[name][role], default=str)}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(reports, handle, indent=2, default=str)
    return reports


if __name__ == "__main__":
    main()
