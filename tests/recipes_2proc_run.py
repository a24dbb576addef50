"""Run toy recipes one after the other in this process (launched on 2 CPU processes by tests/test_recipes.py).

    accelerate launch --multi_gpu --num_processes 2 tests/recipes_2proc_run.py OUT_DIR NAME [NAME ...]

Each NAME is a toy YAML; the recipe is the script its header names; it runs on the smoke testbed for 2 steps and
writes OUT_DIR/NAME/trainer_state.json (main process).
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_recipes import RECIPES, SMOKE, TOY_RUNS, script_of  # noqa: E402
from tiny import end_distributed_run  # noqa: E402

if __name__ == "__main__":
    out_dir, names = Path(sys.argv[1]), sys.argv[2:]
    for name in names:
        yaml_path = RECIPES / "toy" / f"{name}.yaml"
        sys.argv = [str(script_of(yaml_path)), "--config", str(yaml_path), *SMOKE, *TOY_RUNS[name],
                    "--output_dir", str(out_dir / name)]
        runpy.run_path(sys.argv[0], run_name="__main__")
    end_distributed_run()
