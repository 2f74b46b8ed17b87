#!/usr/bin/env bash
# Baseline vs holistic x 4 split seeds on one machine, N_GPUS jobs at a time, one job per GPU
# (trainer=gpu_per_job: each job claims a free GPU, job k tries GPU k % N_GPUS first).
#   N_GPUS=4 sweeps/joblib_gpus.sh
#   N_GPUS=2 TRAINER=cpu sweeps/joblib_gpus.sh       # the same sweep on CPU cores (no pinning)
# SEEDS=0,1 and LOSSES=holistic narrow the grid; extra overrides are appended.
set -euo pipefail
n="${N_GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}"
[ "$n" -ge 1 ] || n=1
exec hdl-train -m hydra/launcher=joblib hydra.launcher.n_jobs="$n" trainer="${TRAINER:-gpu_per_job}" \
  loss="${LOSSES:-baseline,holistic}" data=wine data.split_seed="${SEEDS:-0,1,2,3}" \
  run_id="${RUN_ID:-joblib_split_seeds}" "$@"
