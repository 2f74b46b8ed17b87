"""Recurrent network (Elman RNN, LSTM or GRU) with a linear head.

Inputs are (B, T, F) sequences; (B, T) is read as one feature per step and (B, C, H, W) images
as H steps of C·W features (a row per step). The head reads the last hidden state (for a
bidirectional network: the forward direction at the last step and the backward direction at the
first) or the mean over steps, and maps it to ``num_outputs`` values: class logits, or one
prediction for regression (the task, not the model, decides the loss).

The weights are plain ``weight_ih_l*`` / ``weight_hh_l*`` parameters of a ``torch.nn`` RNN, so
``torch.nn.utils.parametrize`` masks (:mod:`hdl.sparsity`) apply to them without special code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hdl.errors import ConfigError

CELLS: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
POOLINGS = ("last", "mean")


def sequence_shape(input_shape: Sequence[int]) -> tuple[int, int]:
    """(steps, features) of one example given as (T,), (T, F) or a (C, H, W) image."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 1:
        return shape[0], 1
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3:
        channels, height, width = shape
        return height, channels * width
    raise ConfigError(
        f"RNN needs inputs of shape (T,), (T, F) or (C, H, W), got input_shape {shape}"
    )


class RNN(nn.Module):
    """``cell`` (rnn | lstm | gru) layers → last or mean-pooled state → [Dropout] → Linear.

    ``dropout`` is applied between stacked layers (when ``num_layers > 1``) and before the head.
    ``nonlinearity`` (tanh | relu) only concerns the Elman cell.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        cell: str = "lstm",
        hidden_size: int = 64,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        pooling: str = "last",
        nonlinearity: str = "tanh",
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ConfigError(f"model.cell must be one of {sorted(CELLS)}, got {cell!r}")
        if pooling not in POOLINGS:
            raise ConfigError(f"model.pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        if int(hidden_size) < 1:
            raise ConfigError(f"model.hidden_size must be a positive integer, got {hidden_size!r}")
        if int(num_layers) < 1:
            raise ConfigError(f"model.num_layers must be a positive integer, got {num_layers!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {dropout!r}")
        self.steps, features = sequence_shape(input_shape)
        self.features = features
        self.pooling = pooling
        self.hidden_size = int(hidden_size)
        self.bidirectional = bool(bidirectional)
        kwargs = {}
        if cell == "rnn":
            if nonlinearity not in ("tanh", "relu"):
                raise ConfigError(f"model.nonlinearity must be tanh or relu, got {nonlinearity!r}")
            kwargs["nonlinearity"] = nonlinearity
        self.rnn = CELLS[cell](
            input_size=features,
            hidden_size=self.hidden_size,
            num_layers=int(num_layers),
            batch_first=True,
            dropout=float(dropout) if int(num_layers) > 1 else 0.0,
            bidirectional=self.bidirectional,
            **kwargs,
        )
        self.dropout = nn.Dropout(float(dropout)) if float(dropout) > 0 else nn.Identity()
        self.head = nn.Linear(self.hidden_size * (2 if self.bidirectional else 1), int(num_outputs))

    def _as_sequence(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # (B, T): one feature per step
            return x.unsqueeze(-1)
        if x.dim() == 4:  # (B, C, H, W): H steps of C*W features
            return x.permute(0, 2, 1, 3).flatten(2)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self._as_sequence(x))  # (B, T, H * directions)
        if self.pooling == "mean":
            state = out.mean(1)
        elif self.bidirectional:
            h = self.hidden_size
            state = torch.cat([out[:, -1, :h], out[:, 0, h:]], dim=1)
        else:
            state = out[:, -1]
        return self.head(self.dropout(state))
