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
