#!/usr/bin/env bash
# Creates .venv (if missing) with the CPU build of torch and trl_opd installed editable with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch first, pinned: on these machines torch==2.13.0 is a local CPU wheel; any other spec downloads GBs.
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
# DeepSpeed, for tests/test_deepspeed.py (ZeRO-2/3 on CPU processes over gloo): its source release, built without
# prebuilt ops against the torch above (its CPU communication op compiles on first use, with the system's g++ and
# ninja); its dependencies by hand, so pip never reconsiders torch.
.venv/bin/pip install -q --disable-pip-version-check hjson ninja py-cpuinfo pydantic msgpack einops psutil
DS_BUILD_OPS=0 .venv/bin/pip install -q --disable-pip-version-check --no-build-isolation --no-deps "deepspeed==0.19.8"
