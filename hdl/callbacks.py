"""Small Lightning callbacks the trainer always adds."""

from __future__ import annotations

import time

import pytorch_lightning as pl


class EpochTimer(pl.Callback):
    """Wall time per training epoch and per optimizer step (cost is one of the holistic axes)."""

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self.steps: list[int] = []
        self._start = 0.0
        self._first_step = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        self._first_step = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.perf_counter() - self._start
        self.epoch_seconds.append(seconds)
        self.steps.append(trainer.global_step - self._first_step)
        pl_module.log("time/epoch_s", seconds, on_epoch=True, on_step=False)

    @property
    def seconds_per_epoch(self) -> float:
        """Median epoch time (the first epoch carries warm-up, the median ignores it)."""
        if not self.epoch_seconds:
            return float("nan")
        ordered = sorted(self.epoch_seconds)
        return ordered[len(ordered) // 2]

    @property
    def ms_per_step(self) -> float:
        steps = sum(self.steps)
        return 1000.0 * sum(self.epoch_seconds) / steps if steps else float("nan")


class RNGState(pl.Callback):
    """Saves the Python, NumPy and torch (CPU and CUDA) RNG states in every checkpoint and
    restores them when training resumes, so a relaunched run draws the same dropout masks
    as one that was never interrupted. Lightning checkpoints do not carry RNG state.

    Restored at ``on_train_start`` (after the sanity check and any model set-up that draws
    numbers), the last point before the first resumed training step. Under DDP every rank
    restores rank 0's state (the one the checkpoint holds), as seeding had made them equal.
    """

    def __init__(self) -> None:
        self._loaded: dict | None = None

    def state_dict(self) -> dict:
        import random

        import numpy as np
        import torch

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {  # tensors and plain tuples only: Lightning loads checkpoints weights_only
            "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._loaded = dict(state_dict)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded is None:
            return
        import random

        import numpy as np
        import torch

        state, self._loaded = self._loaded, None
        random.setstate(state["python"])
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            cuda = state["cuda"]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)


class ShuffleEpoch(pl.Callback):
    """Sets a ``set_epoch``-able train loader (``IndexBatches``) to the trainer's epoch before
    each epoch, as Lightning does for samplers only. The loader otherwise counts epochs from
    the one it was created in, which after a resume is the checkpoint's (already finished)
    epoch: the resumed run would reshuffle as one epoch earlier."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(trainer.current_epoch)


class Selection:
    """One model's selection on validation: the best value of the monitored metric so far, the
    step, epoch and weights it came from, and the checks without improvement. Used by
    :class:`SelectBest` (one run) and by the stacked jobs (one per member, hdl.stacked)."""

    def __init__(self, monitor: str = "val/loss", mode: str = "min", patience: int | None = None):
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.best: float | None = None
        self.best_step: int | None = None
        self.best_epoch: int | None = None
        self.best_state: dict | None = None
        self.checks = 0
        self.stale = 0

    @property
    def stopped(self) -> bool:
        """``patience`` checks without improvement: this model's training is over."""
        return self.patience is not None and self.stale >= self.patience

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best if self.mode == "min" else value > self.best

    def update(self, value: float, step: int, epoch: int, state) -> None:
        """Record one eligible validation check; ``state()`` gives the weights to keep."""
        self.checks += 1
        if self._better(value):
            self.best, self.best_step, self.best_epoch = value, step, epoch
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in state().items()}
            self.stale = 0
        else:
            self.stale += 1

    def selected(self) -> dict:
        """Which model is evaluated: the step, epoch and monitored value of the chosen check."""
        if self.best_state is None:
            return {"monitor": self.monitor, "step": None, "reason": "no eligible validation check"}
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "value": self.best,
            "step": self.best_step,
            "epoch": self.best_epoch,
            "checks": self.checks,
            "stopped_early": self.stopped,
        }

    def state_dict(self) -> dict:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "checks": self.checks,
            "stale": self.stale,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        for key in ("best", "best_step", "best_epoch", "best_state"):
            setattr(self, key, state_dict.get(key))
        self.checks = int(state_dict.get("checks", 0))
        self.stale = int(state_dict.get("stale", 0))


def selection_eligible(trainer: pl.Trainer) -> bool:
    """Whether this validation check may choose the model: always, except before the final,
    hard-mask round of a sparse run (earlier rounds train a different, soft-masked network)."""
    from hdl.sparsity import SparsityCallback

    for cb in trainer.callbacks:
        if isinstance(cb, SparsityCallback):
            return cb.in_final_round()
    return True


class SelectBest(pl.Callback):
    """Model selection on validation: keeps the weights of the best validation check (by
    ``select.monitor``), counting only checks in the final, hard-mask sparsity round for sparse
    runs. With ``patience``, stops training after that many final-round checks without
    improvement. The chosen weights are part of the callback's state, so a resumed run keeps
    them; :meth:`selected` says which step they come from. The test split is never read here."""

    def __init__(self, monitor: str = "val/loss", mode: str = "min", patience: int | None = None):
        super().__init__()
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.selection = Selection(monitor, mode, patience)

    @property
    def best_state(self) -> dict | None:
        return self.selection.best_state

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not selection_eligible(trainer):
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            from hdl.errors import ConfigError

            raise ConfigError(f"select.monitor={self.monitor} is not a logged validation metric")
        self.selection.update(
            float(value), trainer.global_step, trainer.current_epoch, pl_module.state_dict
        )
        if self.selection.stopped:
            trainer.should_stop = True

    def selected(self) -> dict:
        return self.selection.selected()

    def state_dict(self) -> dict:
        return self.selection.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.selection.load_state_dict(state_dict)
