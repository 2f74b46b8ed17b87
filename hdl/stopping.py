"""Early stopping as one rule with model selection (``callbacks=early_stopping``,
conf/callbacks/early_stopping.yaml): it sets the patience of :class:`hdl.callbacks.SelectBest`,
which counts validation checks without improvement of ``select.monitor`` in the final, hard-mask
sparsity round (earlier rounds train another, soft-masked network: stopping there would end the
schedule early). Equivalent to ``select.patience=N``."""

from __future__ import annotations

import pytorch_lightning as pl

from hdl.errors import ConfigError


class EarlyStopping(pl.Callback):
    def __init__(self, patience: int = 5) -> None:
        super().__init__()
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ConfigError(
                f"callbacks.early_stopping.patience must be an integer >= 1, got {patience!r}"
            )
        self.patience = patience

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from hdl.callbacks import SelectBest

        for cb in trainer.callbacks:
            if isinstance(cb, SelectBest):
                cb.patience = self.patience
