"""The framework's own cost: one epoch through ``Trainer.fit`` vs a plain PyTorch loop over the
same in-memory data (:class:`hdl.data.base.IndexBatches`), model, loss and optimizer."""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from hdl.data.base import IndexBatches
from hdl.losses import HolisticLoss
from hdl.models.mlp import MLP
from hdl.module import HolisticModule


class _QuietModule(HolisticModule):
    """HolisticModule without its per-step ``self.log`` calls: separates Lightning's loop from
    the cost of logging."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        return self.loss.compute(self.net, x, y).total


class _EpochTimer(pl.Callback):
    """Wall time of each training epoch (the loop itself, not Trainer setup)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.times: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._start = self.clock()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.times.append(self.clock() - self._start)


def _fit_epoch(
    module: HolisticModule, data: IndexBatches, accelerator: str, clock: Callable[[], float]
) -> tuple[float, float]:
    """(epoch seconds, whole fit call seconds) of a fresh one-epoch Trainer."""
    timer = _EpochTimer(clock)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=1,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        inference_mode=False,
    )
    start = clock()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=data)
    return timer.times[-1], clock() - start


def _plain_epoch(
    net: nn.Module,
    loss: HolisticLoss,
    data: IndexBatches,
    device: torch.device,
    clock: Callable[[], float],
) -> float:
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    start = clock()
    for x, y in data:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad(set_to_none=True)
        total, _ = loss(net, x, y)
        total.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


def lightning_overhead(
    cfg: Any, device: torch.device, clock: Callable[[], float] = time.perf_counter, seed: int = 0
) -> list[dict[str, Any]]:
    """For each batch size: median epoch seconds of ``Trainer.fit`` (HolisticModule as it is,
    and without its per-step logging) and of the plain loop, measured in alternating rounds
    (the CPU may be shared), and the ratios."""
    g = torch.Generator().manual_seed(seed)
    n, d, c = int(cfg.n_examples), int(cfg.features), int(cfg.classes)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    rows = []
    for batch_size in cfg.batch_sizes:
        torch.manual_seed(seed)
        net = MLP([d], c, hidden=list(cfg.hidden)).to(device)
        loss = HolisticLoss()
        adam = partial(torch.optim.Adam, lr=1e-3)
        module = HolisticModule(net, loss, optimizer=adam)
        quiet = _QuietModule(net, loss, optimizer=adam)
        data = IndexBatches(x, y, int(batch_size), shuffle=True, seed=seed)
        _plain_epoch(net, loss, data, device, clock)  # warm-up of every path
        _fit_epoch(module, data, accelerator, clock)
        _fit_epoch(quiet, data, accelerator, clock)
        fit, call, nolog, plain = [], [], [], []
        for _ in range(int(cfg.rounds)):
            epoch, whole = _fit_epoch(module, data, accelerator, clock)
            fit.append(epoch)
            call.append(whole)
            nolog.append(_fit_epoch(quiet, data, accelerator, clock)[0])
            plain.append(_plain_epoch(net, loss, data, device, clock))
        rows.append(
            {
                "batch_size": int(batch_size),
                "steps_per_epoch": len(data),
                "plain_epoch_ms": 1e3 * statistics.median(plain),
                "fit_epoch_ms": 1e3 * statistics.median(fit),
                "fit_call_ms": 1e3 * statistics.median(call),
                "ratio": statistics.median(fit) / statistics.median(plain),
                "ratio_fit_call": statistics.median(call) / statistics.median(plain),
                "fit_nolog_epoch_ms": 1e3 * statistics.median(nolog),
                "ratio_nolog": statistics.median(nolog) / statistics.median(plain),
            }
        )
    return rows
