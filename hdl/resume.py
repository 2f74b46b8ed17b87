"""Preemption-safe relaunch: find the checkpoint to resume from and give W&B a stable run id.

A run's identity is its directory: ``outputs/<name>/runs/<run_id>`` (or the job's sub-directory
of a sweep, named by its overrides). Relaunching the same config with the same ``run_id`` (or
a SLURM requeue by submitit, which replays the pickled job) finds the same directory, resumes
from its newest readable checkpoint and logs into the same W&B run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from pytorch_lightning.utilities import rank_zero_warn


def _readable(path: Path) -> bool:
    """A checkpoint cut short by a kill cannot be loaded; skip it rather than crash on it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - any failure means "not resumable"
        return False
    return isinstance(state, dict) and "state_dict" in state and "loops" in state


def resume_checkpoint(checkpoint_dir: Path | None) -> Path | None:
    """``last.ckpt`` in ``checkpoint_dir`` if it loads, else the newest other readable one."""
    if checkpoint_dir is None or not checkpoint_dir.is_dir():
        return None
    candidates = sorted(
        checkpoint_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    candidates.sort(key=lambda p: p.name != "last.ckpt")  # stable: last.ckpt first
    for path in candidates:
        if _readable(path):
            return path
        rank_zero_warn(f"resume: skipping unreadable checkpoint {path}")
    return None


def wandb_run_id(run_dir: Path) -> str:
    """A W&B run id fixed by the run directory, so a relaunch resumes the run, not a new one."""
    digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()
    return f"hdl-{digest[:16]}"
