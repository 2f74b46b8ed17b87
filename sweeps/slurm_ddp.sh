#!/usr/bin/env bash
# Baseline vs holistic x 5 split seeds on SLURM: one SLURM job per run, each a DDP run on
# NODES x GPUS GPUs (srun starts one rank per GPU), resumable after preemption / time limit.
#   PARTITION=gpu GPUS=4 sweeps/slurm_ddp.sh
#   PARTITION=gpu GPUS=4 NODES=2 sweeps/slurm_ddp.sh data=digits trainer.max_epochs=60
# Relaunching with the same RUN_ID resumes every unfinished job from its last checkpoint.
set -euo pipefail
exec hdl-train -m hydra/launcher=slurm hydra.launcher.partition="${PARTITION:?set PARTITION}" \
  hydra.launcher.timeout_min="${TIMEOUT_MIN:-240}" \
  trainer=ddp trainer.accelerator=gpu trainer.devices="${GPUS:-4}" trainer.num_nodes="${NODES:-1}" \
  loss="${LOSSES:-baseline,holistic}" data=wine data.split_seed="${SEEDS:-0,1,2,3,4}" \
  run_id="${RUN_ID:-slurm_split_seeds}" "$@"
