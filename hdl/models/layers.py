"""Small building blocks shared by the architectures."""

from __future__ import annotations

from torch import nn

from hdl.errors import ConfigError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
}


def activation(name: str) -> nn.Module:
    """A fresh activation module by name (``model.activation`` in config)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(
            f"model.activation must be one of {sorted(ACTIVATIONS)}, got {name!r}"
        ) from None


def dense_stack(
    in_features: int, hidden: list[int], act: str, dropout: float, batch_norm: bool = False
) -> tuple[nn.Sequential, int]:
    """Linear → [BatchNorm] → activation → [Dropout] for each hidden size; returns the stack and
    its output width."""
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {dropout!r}")
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        if int(size) < 1:
            raise ConfigError(f"model hidden sizes must be positive, got {list(hidden)!r}")
        layers.append(nn.Linear(width, int(size)))
        if batch_norm:
            layers.append(nn.BatchNorm1d(int(size)))
        layers.append(activation(act))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(size)
    return nn.Sequential(*layers), width
