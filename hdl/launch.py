"""How a job meets its hardware: one GPU per sweep job, DDP ranks, SLURM.

* :func:`claim_gpu` pins a job of a sweep on one multi-GPU machine to its own GPU (``joblib`` or
  ``submitit`` local launchers): it takes an exclusive file lock per GPU, trying GPU
  ``job_num % n`` first, so that with as many workers as GPUs every running job has its own.
* :func:`check_ddp_launch` refuses the one combination that cannot work: Lightning's ``ddp``
  strategy re-runs the command line in each rank, which under ``-m`` restarts the whole sweep.
* :func:`cluster_plugins`: under SLURM, requeueing is submitit's job (its ``checkpoint`` hook
  resubmits the job), so Lightning's own SLURM auto-requeue is switched off.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from hdl.errors import ConfigError

# strategies whose launcher re-executes ``sys.argv`` for ranks > 0
_SCRIPT_DDP = ("ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")


def lock_dir() -> Path:
    """Where GPU locks live: ``$HDL_GPU_LOCK_DIR``, else a per-user folder in the temp dir."""
    explicit = os.environ.get("HDL_GPU_LOCK_DIR")
    path = (
        Path(explicit) if explicit else Path(tempfile.gettempdir()) / f"hdl-gpu-locks-{os.getuid()}"
    )
    path.mkdir(parents=True, exist_ok=True)
    return path


class GpuClaim:
    """An exclusive claim on one GPU index, held until :meth:`release` (or process exit)."""

    def __init__(self, index: int, handle: IO[str]) -> None:
        self.index = index
        self._handle: IO[str] | None = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def claim_gpu(
    job_num: int,
    n_gpus: int,
    directory: Path | None = None,
    timeout_s: float = 7 * 24 * 3600.0,
    poll_s: float = 1.0,
) -> GpuClaim:
    """Claim a free GPU out of ``n_gpus``, preferring ``job_num % n_gpus``; wait while all are busy.

    Locks are ``flock`` locks, so a crashed job frees its GPU, and two claims in one process
    exclude each other as well as claims in different processes.
    """
    if n_gpus < 1:
        raise ConfigError("trainer.gpu_per_job needs at least one visible GPU, found none")
    directory = directory or lock_dir()
    order = [(job_num + k) % n_gpus for k in range(n_gpus)]
    deadline = time.monotonic() + timeout_s
    while True:
        for index in order:
            handle = open(directory / f"gpu{index}.lock", "w")  # noqa: SIM115 - held by GpuClaim
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            return GpuClaim(index, handle)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no free GPU out of {n_gpus} within {timeout_s:.0f} s")
        time.sleep(poll_s)


def processes_created_externally() -> bool:
    """True when ranks are started by SLURM (srun / submitit tasks), torchrun or a parent rank."""
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return (
        "LOCAL_RANK" in os.environ or SLURMEnvironment.detect() or TorchElasticEnvironment.detect()
    )


def _world_size(trainer: dict[str, Any]) -> int:
    devices = trainer.get("devices", 1)
    if isinstance(devices, list | tuple):
        n = len(devices)
    elif isinstance(devices, int):
        n = devices
    elif isinstance(devices, str) and devices.strip().isdigit():
        n = int(devices)
    else:  # "auto" / "-1": as many as there are; assume several
        n = 2
    return n * int(trainer.get("num_nodes", 1) or 1)


def check_ddp_launch(trainer: dict[str, Any], multirun: bool) -> None:
    """Refuse script-relaunching DDP inside a Hydra multirun unless ranks are started externally."""
    strategy = trainer.get("strategy")
    if not multirun or not isinstance(strategy, str) or strategy not in _SCRIPT_DDP:
        return
    if _world_size(trainer) > 1 and not processes_created_externally():
        raise ConfigError(
            f"trainer.strategy={strategy} re-runs the command line in every rank, which under -m "
            "restarts the whole sweep: launch DDP sweeps with hydra/launcher=slurm (one task per "
            "GPU), or sweep with one job per GPU (trainer=gpu_per_job)"
        )


def cluster_plugins() -> list:
    """Under SLURM: a SLURMEnvironment without auto-requeue (submitit requeues; see sweeps/)."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def rank_deviation(trainer, module) -> float:
    """Largest difference between ranks of any parameter or buffer fingerprint (0.0: in sync).

    Each tensor is summarised by its sum and its sum of squares (float64); rank 0 compares the
    gathered fingerprints. DDP keeps weights, mask logits and theta identical by construction;
    this checks it after training instead of assuming it. A collective: call on every rank.
    """
    import torch

    tensors = [t for t in module.parameters()] + [t for t in module.buffers()]
    fingerprint = torch.stack(
        [
            torch.stack([t.detach().double().sum(), t.detach().double().pow(2).sum()])
            for t in tensors
        ]
    ).to(trainer.strategy.root_device)
    gathered = trainer.strategy.all_gather(fingerprint)  # (world, n, 2)
    return float((gathered - gathered[0:1]).abs().max())
