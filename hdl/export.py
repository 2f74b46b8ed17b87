"""``hdl-export``: the trained network with its dead units removed physically.

A hidden unit (a Linear output, or a Conv2d output channel) is dead when its incoming weights
are all zero (its pre-activation is its bias, a constant: the constant it contributes through the
activation and pooling is folded into the next layer's bias, or, where zero padding makes it
depend on the position, into a constant map added after the next convolution) or when its
outgoing weights are all zero (it contributes nothing). Dead units are removed from both layers,
and removal repeats until nothing changes (removing a layer's rows can leave units of the layer
before without outgoing weights). Batch norm (eval mode) is folded into the layer before it and
dropout dropped. The input interface is kept (unused input features are not removed).

Written to ``<run dir>/export/``: ``model.pt`` (a spec of the layers and their state dict, loaded
by :func:`load_exported` with ``weights_only=True``), ``model.ts`` (TorchScript, runnable without
hdl) and ``export.json``: dense vs exported parameters, non-zero parameters, file size, CPU
latency per batch of 1 and of 256 (median, one thread), the optional torch.sparse CSR path for
the Linear layers, and the largest output difference from the masked network on the test split.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hdl.bounds import Reshape, sequential_layers
from hdl.errors import ConfigError, HDLError
from hdl.models.cnn import Normalize
from hdl.models.layers import ACTIVATIONS

FORMAT = "hdl-export/1"
TOLERANCE = 1e-5  # max |exported - masked| <= TOLERANCE * max(1, max |masked|)
_ACTIVATION_TYPES = tuple(ACTIVATIONS.values())
_CHANNELWISE = (*_ACTIVATION_TYPES, nn.MaxPool2d, nn.AvgPool2d)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)


class AddConstant(nn.Module):
    """``x + value``: the position-dependent constant that removed channels contribute through a
    zero-padded convolution."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.value


class CSRLinear(nn.Module):
    """A Linear layer whose weight is a torch.sparse CSR matrix (the optional sparse path)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            self.weight = linear.weight.detach().to_sparse_csr()
        self.bias = linear.bias.detach().clone()

    def forward(self, x: Tensor) -> Tensor:
        return torch.sparse.mm(self.weight, x.T).T + self.bias


# --- the plan: mixing layers and what lies between them ---------------------------------------
@dataclass
class _Mix:
    """A Linear or Conv2d layer with its (masked, BN-folded) weights."""

    name: str
    kind: str  # linear | conv
    weight: Tensor
    bias: Tensor
    conv: dict[str, Any] = field(default_factory=dict)
    bias_map: Tensor | None = None  # (C, H, W) added after the convolution
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()

    def apply(self, h: Tensor, bias: bool = True) -> Tensor:
        if self.kind == "linear":
            return F.linear(h, self.weight, self.bias if bias else None)
        y = F.conv2d(h, self.weight, self.bias if bias else None, **self.conv)
        return y + self.bias_map if bias and self.bias_map is not None else y

    def modules(self) -> list[nn.Module]:
        if self.kind == "linear":
            layer: nn.Module = nn.Linear(self.weight.shape[1], self.weight.shape[0])
        else:
            layer = nn.Conv2d(
                self.weight.shape[1],
                self.weight.shape[0],
                tuple(self.weight.shape[2:]),
                **self.conv,
            )
        with torch.no_grad():
            layer.weight.copy_(self.weight)
            layer.bias.copy_(self.bias)
        return [layer] if self.bias_map is None else [layer, AddConstant(self.bias_map.clone())]


@dataclass
class _Plan:
    front: list[nn.Module]
    mixes: list[_Mix]
    between: list[list[nn.Module]]  # between[k]: the layers after mixes[k]

    def chain(self) -> list:
        out: list = list(self.front)
        for mix, after in zip(self.mixes, self.between, strict=True):
            out.append(mix)
            out += after
        return out


def _plan(model: nn.Module, input_shape: Sequence[int]) -> _Plan:
    try:
        layers = sequential_layers(model, input_shape)
    except ConfigError as err:
        raise ConfigError(str(err).replace("cannot bound", "cannot export")) from None
    front: list[nn.Module] = []
    mixes: list[_Mix] = []
    between: list[list[nn.Module]] = []
    current = front
    for name, m in layers:
        if isinstance(m, _DROPOUT):
            continue
        if isinstance(m, nn.Linear):
            w = m.weight.detach().clone()  # the parametrization evaluated: the masked weights
            b = m.bias.detach().clone() if m.bias is not None else w.new_zeros(w.shape[0])
            mixes.append(_Mix(name, "linear", w, b))
        elif isinstance(m, nn.Conv2d):
            if m.groups != 1 or m.padding_mode != "zeros":
                raise ConfigError(f"cannot export {name}: Conv2d with groups or non-zero padding")
            w = m.weight.detach().clone()
            b = m.bias.detach().clone() if m.bias is not None else w.new_zeros(w.shape[0])
            conv = {"stride": m.stride, "padding": m.padding, "dilation": m.dilation}
            mixes.append(_Mix(name, "conv", w, b, conv))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if not mixes or current is not between[-1] or current:
                raise ConfigError(f"cannot export {name}: batch norm not right after Linear/Conv2d")
            if m.running_mean is None:
                raise ConfigError(f"cannot export {name}: batch norm without running statistics")
            mix = mixes[-1]
            with torch.no_grad():
                weight = m.weight if m.weight is not None else torch.ones_like(m.running_mean)
                bias = m.bias if m.bias is not None else torch.zeros_like(m.running_mean)
                scale = weight / torch.sqrt(m.running_var + m.eps)
                view = (-1,) + (1,) * (mix.weight.dim() - 1)
                mix.weight = mix.weight * scale.reshape(view)
                mix.bias = mix.bias * scale + bias - m.running_mean * scale
            mix.name = f"{mix.name}+{name}"
            continue
        elif isinstance(m, Reshape) and len(m.shape) == 1:  # the forward's flatten(1)
            current.append(nn.Flatten())
            continue
        elif isinstance(m, (*_CHANNELWISE, nn.Flatten, Reshape, Normalize)):
            if isinstance(m, _ACTIVATION_TYPES) and repr(m) != repr(type(m)()):
                raise ConfigError(f"cannot export {name}: {m!r} (only default activations)")
            current.append(copy.deepcopy(m))
            continue
        else:
            raise ConfigError(
                f"cannot export layer {name} ({type(m).__name__}): supported layers are Linear, "
                "Conv2d, activations, MaxPool2d, AvgPool2d, Flatten, Normalize, BatchNorm, Dropout"
            )
        between.append([])
        current = between[-1]
    if not mixes:
        raise ConfigError("cannot export a network without Linear or Conv2d layers")
    plan = _Plan(front, mixes, between)
    _shapes(plan, input_shape)
    return plan


@torch.no_grad()
def _shapes(plan: _Plan, input_shape: Sequence[int]) -> None:
    h = plan.mixes[0].weight.new_zeros((1, *input_shape))
    for item in plan.chain():
        if isinstance(item, _Mix):
            item.in_shape = tuple(h.shape[1:])
            h = item.apply(h)
            item.out_shape = tuple(h.shape[1:])
        else:
            h = item(h)


# --- removing dead units ----------------------------------------------------------------------
def _pair_layout(plan: _Plan, k: int) -> tuple[list[nn.Module], bool] | None:
    """(channelwise layers between mixes k and k+1, whether a flatten ends them), or None when
    units of mix k cannot be matched to inputs of mix k+1."""
    a, b = plan.mixes[k], plan.mixes[k + 1]
    ops = plan.between[k]
    flatten = bool(ops) and isinstance(ops[-1], (nn.Flatten, Reshape))
    body = ops[:-1] if flatten else ops
    if not all(isinstance(op, _CHANNELWISE) for op in body):
        return None
    if (
        a.kind == "linear"
        and b.kind == "linear"
        and not any(isinstance(op, (nn.MaxPool2d, nn.AvgPool2d)) for op in body)
    ):
        return body, False
    if a.kind == "conv" and b.kind == "conv" and not flatten:
        return body, False
    if a.kind == "conv" and b.kind == "linear" and flatten:
        return body, True
    return None


def _outgoing(b: _Mix, n: int, flatten: bool) -> Tensor:
    """(n, ...) the outgoing weights of each of the n units feeding mix ``b``."""
    if b.kind == "conv":
        return b.weight.transpose(0, 1).reshape(n, -1)
    if flatten:  # channel-major flatten: channel j owns a contiguous block of columns
        return b.weight.reshape(b.weight.shape[0], n, -1).transpose(0, 1).reshape(n, -1)
    return b.weight.T


@torch.no_grad()
def _fold_constants(a: _Mix, b: _Mix, body: list[nn.Module], flatten: bool, units: Tensor) -> None:
    """Add what the input-independent ``units`` of ``a`` contribute to ``b``'s bias (or to its
    constant map when the contribution depends on the position)."""
    h = a.weight.new_zeros((1, *a.out_shape))
    pre = a.bias[units]
    if a.kind == "conv":
        pre = pre[:, None, None].expand(-1, *a.out_shape[1:])
        if a.bias_map is not None:
            pre = pre + a.bias_map[units]
    h[0, units] = pre
    for op in body:  # channelwise: unit j's output depends on unit j's input alone
        h = op(h)
    h[:, ~units] = 0
    if flatten:
        h = h.reshape(1, -1)
    c = b.apply(h, bias=False)[0]
    if b.kind == "linear":
        b.bias = b.bias + c
        return
    spread = (c.amax(dim=(1, 2)) - c.amin(dim=(1, 2))).abs().max()
    if b.bias_map is None and spread <= 1e-6 * (1.0 + float(c.abs().max())):
        b.bias = b.bias + c.mean(dim=(1, 2))
    else:
        b.bias_map = c if b.bias_map is None else b.bias_map + c


@torch.no_grad()
def _prune_pair(plan: _Plan, k: int, channel_multiple: int = 1) -> bool:
    layout = _pair_layout(plan, k)
    if layout is None:
        return False
    body, flatten = layout
    a, b = plan.mixes[k], plan.mixes[k + 1]
    n = a.weight.shape[0]
    dead_in = (a.weight.reshape(n, -1) == 0).all(dim=1)
    dead_out = (_outgoing(b, n, flatten) == 0).all(dim=1)
    remove = dead_in | dead_out
    if a.kind == "conv" and channel_multiple > 1:  # keep some dead channels, unchanged
        kept = int((~remove).sum())
        target = min(n, -(-max(kept, 1) // channel_multiple) * channel_multiple)
        remove[remove.nonzero().flatten()[: target - kept]] = False
    if not remove.any():
        return False
    fold = dead_in & ~dead_out & remove
    if fold.any():
        _fold_constants(a, b, body, flatten, fold)
    keep = ~remove
    if not keep.any():  # a layer keeps one unit; its contribution is folded, its weights zeroed
        keep[0] = True
        if b.kind == "conv" or not flatten:
            b.weight[:, 0] = 0
        else:
            b.weight.reshape(b.weight.shape[0], n, -1)[:, 0] = 0
    a.weight, a.bias = a.weight[keep], a.bias[keep]
    if a.bias_map is not None:
        a.bias_map = a.bias_map[keep]
    if b.kind == "linear" and flatten:
        rows = b.weight.shape[0]
        b.weight = b.weight.reshape(rows, n, -1)[:, keep].reshape(rows, -1)
    else:
        b.weight = b.weight[:, keep]
    return int(keep.sum()) < n


def prune(plan: _Plan, input_shape: Sequence[int], channel_multiple: int = 1) -> dict[str, int]:
    """Remove dead units until nothing changes; returns the units removed per layer.
    ``channel_multiple`` > 1 keeps the channel count of every convolution a multiple of it (or
    its original count), keeping some dead channels unchanged: CPU convolution kernels can be
    slower on odd channel counts than on the larger original one (docs/verification.md)."""
    before = {m.name: m.weight.shape[0] for m in plan.mixes}
    changed = True
    while changed:
        changed = False
        for k in range(len(plan.mixes) - 1):
            changed |= _prune_pair(plan, k, channel_multiple)
            _shapes(plan, input_shape)
    return {m.name: before[m.name] - m.weight.shape[0] for m in plan.mixes[:-1]}


# --- the module, its file, its spec -----------------------------------------------------------
def build_module(plan: _Plan) -> nn.Sequential:
    layers: list[nn.Module] = []
    for item in plan.chain():
        layers += item.modules() if isinstance(item, _Mix) else [copy.deepcopy(item)]
    return nn.Sequential(*layers).eval()


def _spec(m: nn.Module) -> dict[str, Any]:
    if isinstance(m, nn.Linear):
        return {"type": "Linear", "in": m.in_features, "out": m.out_features}
    if isinstance(m, nn.Conv2d):
        return {
            "type": "Conv2d",
            "in": m.in_channels,
            "out": m.out_channels,
            "kernel_size": list(m.kernel_size),
            "stride": list(m.stride),
            "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
            "dilation": list(m.dilation),
        }
    if isinstance(m, AddConstant):
        return {"type": "AddConstant", "shape": list(m.value.shape)}
    if isinstance(m, Normalize):
        return {
            "type": "Normalize",
            "mean": m.mean.flatten().tolist(),
            "std": m.std.flatten().tolist(),
        }
    if isinstance(m, Reshape):
        return {"type": "Reshape", "shape": list(m.shape)}
    if isinstance(m, nn.Flatten):
        return {"type": "Flatten", "start_dim": m.start_dim, "end_dim": m.end_dim}
    if isinstance(m, nn.MaxPool2d):
        keys = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
        return {"type": "MaxPool2d", **{k: getattr(m, k) for k in keys}}
    if isinstance(m, nn.AvgPool2d):
        keys = (
            "kernel_size",
            "stride",
            "padding",
            "ceil_mode",
            "count_include_pad",
            "divisor_override",
        )
        return {"type": "AvgPool2d", **{k: getattr(m, k) for k in keys}}
    if isinstance(m, _ACTIVATION_TYPES):
        return {"type": type(m).__name__}
    raise ConfigError(f"cannot export {type(m).__name__}")  # pragma: no cover - planned away


def _from_spec(spec: dict[str, Any]) -> nn.Module:
    kind, args = spec["type"], {k: v for k, v in spec.items() if k != "type"}
    if kind == "Linear":
        return nn.Linear(args["in"], args["out"])
    if kind == "Conv2d":
        pad = args["padding"] if isinstance(args["padding"], str) else tuple(args["padding"])
        return nn.Conv2d(
            args["in"],
            args["out"],
            tuple(args["kernel_size"]),
            stride=tuple(args["stride"]),
            padding=pad,
            dilation=tuple(args["dilation"]),
        )
    if kind == "AddConstant":
        return AddConstant(torch.zeros(args["shape"]))
    if kind == "Normalize":
        return Normalize(args["mean"], args["std"])
    if kind == "Reshape":
        return Reshape(args["shape"])
    if kind == "Flatten":
        return nn.Flatten(**args)
    if kind in ("MaxPool2d", "AvgPool2d"):
        return getattr(nn, kind)(**args)
    if kind in {t.__name__ for t in _ACTIVATION_TYPES}:
        return getattr(nn, kind)()
    raise ValueError(f"unknown exported layer type {kind!r}")


def save_exported(module: nn.Sequential, path: Path, input_shape: Sequence[int]) -> None:
    torch.save(
        {
            "format": FORMAT,
            "input_shape": list(input_shape),
            "layers": [_spec(m) for m in module],
            "state_dict": module.state_dict(),
        },
        path,
    )


def load_exported(path: str | Path) -> nn.Sequential:
    """The exported network of ``model.pt`` (no pickled code: ``weights_only=True``)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("format") != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} file")
    module = nn.Sequential(*(_from_spec(s) for s in saved["layers"]))
    module.load_state_dict(saved["state_dict"])
    return module.eval()


def export_network(
    model: nn.Module, input_shape: Sequence[int], channel_multiple: int = 1
) -> tuple[nn.Sequential, dict[str, int]]:
    """The network as an ``nn.Sequential`` with dead units removed (same outputs as ``model``
    in eval mode) and the units removed per layer (see :func:`prune`)."""
    if int(channel_multiple) < 1:
        raise ConfigError(f"channel multiple must be >= 1, got {channel_multiple!r}")
    plan = _plan(model, input_shape)
    removed = prune(plan, input_shape, int(channel_multiple))
    return build_module(plan), removed


def sparse_path(module: nn.Sequential) -> nn.Sequential:
    """A copy with every Linear layer as a torch.sparse CSR matmul."""
    out = copy.deepcopy(module)
    for i, m in enumerate(out):
        if isinstance(m, nn.Linear):
            out[i] = CSRLinear(m)
    return out


# --- measurements -----------------------------------------------------------------------------
def latency_ms(modules: dict[str, nn.Module], x: Tensor, repeats: int) -> dict[str, float]:
    """Median milliseconds of one forward of each module on one CPU thread. The modules take
    turns (the order rotates every repeat), so a change of machine load hits them alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    names = list(modules)
    times: dict[str, list[float]] = {name: [] for name in names}
    try:
        with torch.inference_mode():
            for name in names:
                for _ in range(3):
                    modules[name](x)
            for r in range(repeats):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    start = time.perf_counter()
                    modules[name](x)
                    times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {name: 1000.0 * statistics.median(t) for name, t in times.items()}


def _counts(module: nn.Module) -> tuple[int, int, int]:
    """(parameters, non-zero parameters, entries of the constant maps)."""
    params = list(module.parameters())
    maps = sum(m.value.numel() for m in module.modules() if isinstance(m, AddConstant))
    return sum(t.numel() for t in params), sum(int((t != 0).sum()) for t in params), maps


def _nbytes(obj: Any) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes


def _max_diff(reference: Tensor, other: Tensor) -> tuple[float, float]:
    diff = float((reference - other).abs().max()) if reference.numel() else 0.0
    return diff, diff / max(1.0, float(reference.abs().max()) if reference.numel() else 1.0)


def export_run(
    path: str | Path,
    *,
    out: str | Path | None = None,
    repeats: int = 50,
    max_examples: int | None = None,
    torchscript: bool = True,
    write: bool = True,
    channel_multiple: int = 1,
) -> dict[str, Any]:
    """Export one run; write ``export/`` into its run dir (or ``out``) when ``write``."""
    from hdl.attacks import predict
    from hdl.runs import load_run
    from hdl.sparsity import effective_state, parameter_counts

    run = load_run(path, "cpu")
    net = run.module.net.eval()
    x, _ = run.data.tensors["test"]
    if max_examples:
        x = x[:max_examples]
    shape = tuple(x.shape[1:])
    exported, removed = export_network(net, shape, channel_multiple)
    masked_out = predict(net, x)
    with torch.no_grad():
        exported_out = exported(x)
    diff, rel = _max_diff(masked_out, exported_out)
    # dense: the same network with the masks baked in and batch norm folded, no unit removed
    # (not strip_masks on a deepcopy: removing a parametrization edits the class that the copy
    # shares with the original)
    dense = build_module(_plan(net, shape))
    with torch.no_grad():
        dense_diff, _ = _max_diff(masked_out, dense(x))
    batch = (
        x[:256]
        if len(x) >= 256
        else x.repeat(math.ceil(256 / max(len(x), 1)), *([1] * len(shape)))[:256]
    )
    one = x[:1]
    sparse = sparse_path(exported)
    with torch.no_grad():
        sparse_diff, _ = _max_diff(exported_out, sparse(x))
    variants = {"dense": dense, "exported": exported, "exported_csr": sparse}
    by_batch = {
        b: latency_ms(variants, inputs, repeats) for b, inputs in (("1", one), ("256", batch))
    }
    lat = {name: {b: by_batch[b][name] for b in by_batch} for name in variants}
    total, nonzero = parameter_counts(net)
    ex_total, ex_nonzero, ex_maps = _counts(exported)
    folder = Path(out) if out else run.run_dir / "export"
    report: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "checkpoint": str(run.checkpoint),
        "input_shape": list(shape),
        "removed_units": removed,
        "channel_multiple": int(channel_multiple),
        "layers": [repr(m) for m in exported],
        "dense": {
            "parameters": total,
            "nonzero_parameters": nonzero,
            "file_bytes": _nbytes(effective_state(net)),
            "latency_ms": lat["dense"],
        },
        "exported": {
            "parameters": ex_total,
            "nonzero_parameters": ex_nonzero,
            "constant_map_entries": ex_maps,
            "latency_ms": lat["exported"],
        },
        "csr_linear": {
            "latency_ms": lat["exported_csr"],
            "max_abs_diff": sparse_diff,
            "faster_than_exported": {
                b: lat["exported_csr"][b] < lat["exported"][b] for b in ("1", "256")
            },
        },
        "check": {
            "examples": len(x),
            "max_abs_diff": diff,
            "relative": rel,
            "dense_max_abs_diff": dense_diff,
            "tolerance": TOLERANCE,
            "agrees": rel <= TOLERANCE,
        },
        "latency": {"threads": 1, "repeats": repeats, "statistic": "median"},
    }
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        save_exported(exported, folder / "model.pt", shape)
        report["exported"]["file_bytes"] = (folder / "model.pt").stat().st_size
        report["files"] = [str(folder / "model.pt")]
        reloaded = load_exported(folder / "model.pt")
        with torch.no_grad():
            report["check"]["reloaded_max_abs_diff"] = _max_diff(exported_out, reloaded(x))[0]
        if torchscript:
            ts = _torchscript(exported, batch, folder / "model.ts")
            if ts is not None:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    report["check"]["torchscript_max_abs_diff"] = _max_diff(exported_out, ts(x))[0]
                report["exported"]["torchscript_bytes"] = (folder / "model.ts").stat().st_size
                report["files"].append(str(folder / "model.ts"))
        (folder / "export.json").write_text(json.dumps(report, indent=2))
    else:
        report["exported"]["file_bytes"] = _nbytes({"state_dict": exported.state_dict()})
    return report


def _torchscript(module: nn.Module, example: Tensor, path: Path):
    """Trace and save ``module``; the reloaded TorchScript module (None where torch.jit is gone).
    torch.jit is deprecated in recent torch (a FutureWarning, silenced here) but still works."""
    if not hasattr(torch, "jit"):  # pragma: no cover
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
        traced.save(str(path))
        return torch.jit.load(str(path))


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{report['run_dir']} · export (dead units removed)")
    for col in (
        "network",
        "parameters",
        "non-zero",
        "file bytes",
        "ms / batch 1",
        "ms / batch 256",
    ):
        table.add_column(col, justify="right")
    for name, key in (("dense (masks baked in)", "dense"), ("exported", "exported")):
        r = report[key]
        table.add_row(
            name,
            str(r["parameters"]),
            str(r["nonzero_parameters"]),
            str(r["file_bytes"]),
            f"{r['latency_ms']['1']:.4f}",
            f"{r['latency_ms']['256']:.4f}",
        )
    csr = report["csr_linear"]["latency_ms"]
    table.add_row("exported, CSR Linear", "", "", "", f"{csr['1']:.4f}", f"{csr['256']:.4f}")
    console.print(table)
    console.print(f"removed units per layer: {report['removed_units']}")
    c = report["check"]
    verdict = "agrees" if c["agrees"] else "[bold red]DISAGREES[/]"
    console.print(
        f"exported vs masked network on {c['examples']} test inputs: max |diff| "
        f"{c['max_abs_diff']:.2e} (relative {c['relative']:.2e}, tolerance {c['tolerance']:g}): {verdict}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hdl-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories or checkpoint files")
    parser.add_argument("--out", help="output folder (default: <run dir>/export)")
    parser.add_argument("--repeats", type=int, default=50, help="latency repeats (median)")
    parser.add_argument("--max-examples", type=int, help="check on the first N test examples")
    parser.add_argument("--no-torchscript", action="store_true", help="skip model.ts")
    parser.add_argument(
        "--channel-multiple",
        type=int,
        default=1,
        help="keep conv channel counts a multiple of this (some dead channels stay; default: "
        "%(default)s, every dead unit removed)",
    )
    args = parser.parse_args(argv)
    failed = False
    try:
        if args.repeats < 1:
            raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
        if args.out and len(args.runs) > 1:
            raise ConfigError("--out takes one run")
        for path in args.runs:
            report = export_run(
                path,
                out=args.out,
                repeats=args.repeats,
                max_examples=args.max_examples,
                torchscript=not args.no_torchscript,
                channel_multiple=args.channel_multiple,
            )
            print_report(report)
            print(f"wrote {', '.join(report['files'])}")
            failed |= not report["check"]["agrees"]
    except HDLError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if failed:
        print("error: the exported network does not match the masked one", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
