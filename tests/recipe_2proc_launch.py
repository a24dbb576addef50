"""Run one recipe script with its arguments, then end the distributed run cleanly (see `tiny.end_distributed_run`).

    accelerate launch --multi_gpu --num_processes 2 tests/recipe_2proc_launch.py recipes/rlad.py --config ...
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import end_distributed_run  # noqa: E402

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    end_distributed_run()
