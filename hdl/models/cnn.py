"""Convolutional network: conv/pool blocks, then dense layers, then a linear head.

Inputs are (B, C, H, W) images or (B, H, W) single-channel images (a channel is added). Any input
normalisation is a layer *inside* the model (:class:`Normalize`), so attacks and the robust
term see, perturb and clamp the real [0, 1] pixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hdl.errors import ConfigError
from hdl.models.layers import activation as make_activation
from hdl.models.layers import dense_stack

POOLS: dict[str, type[nn.Module]] = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


def _image_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) of one example given as (C, H, W) or (H, W)."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    raise ConfigError(
        f"CNN needs image inputs of shape (C, H, W) or (H, W), got input_shape {shape}"
    )


def _floats(value: float | Sequence[float]) -> torch.Tensor:
    """A 1-D float tensor from a scalar or a sequence (lists, tuples, OmegaConf ListConfig)."""
    if isinstance(value, int | float):
        return torch.tensor([float(value)])
    return torch.tensor([float(v) for v in value])


class Normalize(nn.Module):
    """(x - mean) / std per channel (or one scalar for all), as a fixed layer with buffers."""

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float]) -> None:
        super().__init__()
        mean_t, std_t = _floats(mean), _floats(std)
        if mean_t.numel() == 0 or std_t.numel() == 0:
            raise ConfigError("model.normalize.mean and .std must not be empty")
        if (std_t <= 0).any():
            raise ConfigError(f"model.normalize.std must be positive, got {std!r}")
        self.register_buffer("mean", mean_t.reshape(1, -1, 1, 1))
        self.register_buffer("std", std_t.reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class CNN(nn.Module):
    """``[Normalize] → (Conv → [BatchNorm] → act → [Pool every `pool_every` convs])* → flatten →
    dense stack → Linear(num_outputs)``.

    Convolutions keep the spatial size (``padding="same"``, stride 1); each pooling stage divides
    it by ``pool_size`` (floor). ``pool_every=0`` never pools. ``dropout`` and ``batch_norm``
    also apply to the dense layers (dropout only there). ``normalize`` is ``None`` or a mapping
    with ``mean`` and ``std`` (a scalar or one value per channel).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        channels: Sequence[int] = (32, 32),
        kernel_size: int = 3,
        pool_every: int = 1,
        pooling: str = "max",
        pool_size: int = 2,
        hidden: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        normalize: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        in_channels, height, width = _image_shape(input_shape)
        self.input_channels = in_channels
        if int(kernel_size) < 1:
            raise ConfigError(f"model.kernel_size must be a positive integer, got {kernel_size!r}")
        if int(pool_every) < 0:
            raise ConfigError(f"model.pool_every must be >= 0, got {pool_every!r}")
        if pooling not in POOLS:
            raise ConfigError(f"model.pooling must be one of {sorted(POOLS)}, got {pooling!r}")
        if int(pool_size) < 1:
            raise ConfigError(f"model.pool_size must be a positive integer, got {pool_size!r}")

        if normalize is None:
            self.normalize: nn.Module = nn.Identity()
        else:
            if not isinstance(normalize, Mapping) or {"mean", "std"} - set(normalize):
                raise ConfigError(
                    f"model.normalize must be null or have keys mean and std, got {normalize!r}"
                )
            self.normalize = Normalize(normalize["mean"], normalize["std"])
            for key in ("mean", "std"):
                n = getattr(self.normalize, key).numel()
                if n not in (1, in_channels):
                    raise ConfigError(
                        f"model.normalize.{key} needs 1 or {in_channels} values (one per "
                        f"channel), got {n}"
                    )

        layers: list[nn.Module] = []
        width_c = in_channels
        for i, out_channels in enumerate(channels):
            if int(out_channels) < 1:
                raise ConfigError(f"model.channels must be positive, got {list(channels)!r}")
            layers.append(nn.Conv2d(width_c, int(out_channels), int(kernel_size), padding="same"))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(out_channels)))
            layers.append(make_activation(activation))
            width_c = int(out_channels)
            if pool_every and (i + 1) % int(pool_every) == 0:
                if height < pool_size or width < pool_size:
                    raise ConfigError(
                        f"model: too many pooling stages for {input_shape} inputs "
                        f"(pooling conv block {i + 1} of {list(channels)} at {height}x{width}); "
                        "raise model.pool_every or use fewer channels entries"
                    )
                layers.append(POOLS[pooling](int(pool_size)))
                height, width = height // pool_size, width // pool_size
        self.features = nn.Sequential(*layers)
        self.feature_shape = (width_c, height, width)
        self.body, out_width = dense_stack(
            math.prod(self.feature_shape), list(hidden), activation, float(dropout), batch_norm
        )
        self.head = nn.Linear(out_width, int(num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.head(self.body(self.features(self.normalize(x)).flatten(1)))
