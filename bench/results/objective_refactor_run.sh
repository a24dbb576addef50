#!/usr/bin/env bash
# bench_trainers.py before (12b11b5, /work/baseline) and after (main), back to back in one run, same command.
set -x
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false CUDA_VISIBLE_DEVICES=
PY=/work/main/.venv/bin/python
for side in baseline main; do
  cd /work/$side
  PYTHONPATH=/work/$side timeout 1500 $PY bench/bench_trainers.py --pairs opd_vs_distillation --steps 4 --out refactor_$side > ${OUT:-/tmp/benchcmp}/$side.log 2>&1
  echo "$side rc=$?"
done
