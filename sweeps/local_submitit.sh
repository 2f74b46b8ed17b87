#!/usr/bin/env bash
# A split-seed sweep through submitit's local executor: each job in its own process, with the
# same job pickles, logs (<sweep dir>/.submitit/) and signal handling as on SLURM.
#   sweeps/local_submitit.sh                          # 3 split seeds, holistic loss, wine
#   sweeps/local_submitit.sh trainer.max_epochs=5     # extra overrides are appended
set -euo pipefail
exec hdl-train -m hydra/launcher=local \
  loss=holistic data=wine data.split_seed="${SEEDS:-0,1,2}" \
  run_id="${RUN_ID:-local_split_seeds}" "$@"
