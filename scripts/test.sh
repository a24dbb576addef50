#!/usr/bin/env bash
# The README's test command: set up .venv (and .venv-vllm, vLLM's CPU build for the served-teacher tests), then run
# the whole suite offline on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_vllm.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
       TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false CUDA_VISIBLE_DEVICES=""
exec .venv/bin/python -m pytest tests "$@"
