"""Sparsity of a trained network on its real (masked) weights: zeros per layer and in total,
dead units, units inactive on given inputs, unused input features, real and non-zero
parameter counts (``hdl-eval``'s sparsity report)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid)


@torch.no_grad()
def sparsity_report(net: nn.Module, x: Tensor | None = None) -> dict[str, Any]:
    """Zeros of the effective weights per layer and in total, structurally dead units (an output
    unit whose incoming weights are all zero), units inactive on every input of ``x`` (activation
    output 0, measured with forward hooks), unused input features (:func:`unused_inputs`) and the
    real and non-zero parameter counts."""
    from hdl.sparsity import _weight_modules, parameter_counts, zero_fractions

    layers: dict[str, dict[str, float]] = {}
    for mod_name, module, name in _weight_modules(net):
        w = getattr(module, name)
        rows = w.reshape(w.shape[0], -1)
        key = f"{mod_name}.{name}" if mod_name else name
        layers[key] = {
            "size": float(w.numel()),
            "zero_fraction": float((w == 0).float().mean()),
            "dead_units": float((rows == 0).all(dim=1).sum()),
            "units": float(rows.shape[0]),
        }
    total, nonzero = parameter_counts(net)
    report: dict[str, Any] = {
        "zero_fraction": zero_fractions(net)["total"],
        "layers": layers,
        "dead_units": float(sum(v["dead_units"] for v in layers.values())),
        "unused_input_features": unused_inputs(net),
        "parameters": float(total),
        "effective_parameters": float(nonzero),
    }
    if x is not None:
        report["inactive_units"] = _inactive_units(net, x)
    return report


@torch.no_grad()
def unused_inputs(net: nn.Module) -> int | None:
    """Input features (channels, for a CNN) that no weight of the first layer reads: all-zero
    slices along the input dimension of every input weight of the first weight layer (both
    directions of a bidirectional RNN, ``weight_ih_l0`` and ``weight_ih_l0_reverse``). None when
    the first weight layer is not Linear, Conv or RNN."""
    from hdl.sparsity import _weight_modules

    first = next(iter(_weight_modules(net)), None)
    if first is None:
        return None
    _, module, _ = first
    if isinstance(module, nn.RNNBase):
        names = [n for n in module._flat_weights_names if n.startswith("weight_ih_l0")]
    else:
        names = ["weight"]
    used = None
    for name in names:
        w = getattr(module, name)  # (out, in, ...): dimension 1 is the input
        reads = (w != 0).transpose(0, 1).reshape(w.shape[1], -1).any(dim=1)
        used = reads if used is None else used | reads
    return int((~used).sum())


@torch.no_grad()
def _inactive_units(net: nn.Module, x: Tensor) -> float:
    """Units (features or channels) whose activation output is 0 for every input in ``x``."""
    active: list[Tensor] = []

    def hook(_module: nn.Module, _inp: Any, out: Tensor) -> None:
        if isinstance(out, Tensor) and out.dim() >= 2:
            nonzero = out.detach() != 0
            dims = [0, *range(2, out.dim())]  # over examples and spatial positions
            active.append(nonzero.any(dim=dims) if len(dims) > 1 else nonzero.any(dim=0))

    hooks = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, ACTIVATIONS)]
    training = net.training
    try:
        net.eval()
        device = next(net.parameters()).device
        net(x.to(device))
    finally:
        net.train(training)
        for h in hooks:
            h.remove()
    return float(sum(int((~a).sum()) for a in active))
