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
