#!/usr/bin/env bash
# The README's main command: set up .venv, then run the toy OPD recipe offline on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One torch thread: the figures then depend on torch's version and the CPU's kernels (AVX-512, AVX2, ...), not on
# its core count; the README quotes them for torch 2.13.0+cpu on AVX-512.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
       TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
exec .venv/bin/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  recipes/opd.py --config recipes/toy/opd.yaml "$@"
