"""Certified bounds of ReLU networks over an l_inf ball intersected with the input box.

For an input x with label y, a radius eps and the box [lo, hi] of valid inputs (None:
unbounded), the set is B = {x' : ||x' - x||_inf <= eps, lo <= x' <= hi} (the box widened, per
coordinate, just enough to hold x itself). The network is certified at x when a *lower bound* of
every logit margin z_y(x') - z_i(x'), i != y, over B is > 0. Two bounds (docs/verification.md):

- **IBP** (interval bound propagation; Gowal et al. 2018): a box pushed through the layers,
  affine layers in centre/radius form (c, r) -> (W c + b, |W| r), ReLU and max-pool monotone.
  The last linear layer is merged with the margin matrix C (rows e_y - e_i), so the margins are
  bounded as one affine map of the last hidden box (tighter than subtracting logit intervals).
- **CROWN** (Zhang et al. 2018): a linear lower bound of C z back-substituted layer by layer
  down to the input box, every ReLU replaced by its linear relaxation given the pre-activation
  bounds [l, u]: the chord u (z - l) / (u - l) above, and the adaptive line alpha z below
  (alpha = 1 when u > -l, else 0) for unstable units (l < 0 < u); identity or 0 for stable ones.
  The pre-activation bounds of every ReLU are themselves CROWN bounds (only for units that the
  interval bound leaves unstable), intersected with the interval bound propagated from the
  tightened bounds of the layer below. Max-pool has no linear relaxation here: the backward pass
  stops at a max-pool's output and concretises there with its interval bound (CROWN is exact
  IBP through the max-pool, and full CROWN between max-pools). The reported CROWN margin is the
  larger of the back-substituted bound and the interval bound of the margins from the tightened
  boxes, so it is never looser than IBP (both are sound; pure CROWN can be looser than IBP on
  IBP-trained networks, Zhang et al. 2020).
- **CROWN-IBP** (training; Zhang et al. 2020): IBP for every intermediate bound, CROWN from the
  margins down to the input, mixed with the IBP margins as beta * CROWN-IBP + (1 - beta) * IBP.

Supported layers: Linear, Conv2d (zero padding), ReLU, Flatten, MaxPool2d, AvgPool2d (as a
depthwise convolution), the ``Normalize`` layer of :mod:`hdl.models.cnn`, BatchNorm1d/2d (folded
into the layer before it, with running statistics in eval mode or with given batch statistics),
Dropout (identity, as in eval mode) and Identity; networks: :class:`hdl.models.mlp.MLP`,
:class:`hdl.models.cnn.CNN` and ``nn.Sequential`` of those layers. Anything else raises
:class:`hdl.errors.ConfigError`. Masked (sparse) layers are bounded with their effective
weights: ``module.weight`` evaluates the mask parametrization, so the bounds (and the gradients
of the certified loss) go through ``w * m``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hdl.errors import ConfigError

CERTIFIED_METHODS = ("ibp", "crown_ibp")  # loss.robust.method values of certified training
BOUND_METHODS = ("ibp", "crown")  # what hdl-verify reports
SUPPORTED_LAYERS = (
    "Linear, Conv2d, ReLU, Flatten, MaxPool2d, AvgPool2d, Normalize, BatchNorm1d/2d, Dropout, "
    "Identity"
)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_CHUNK_ELEMENTS = 1 << 24  # largest coefficient tensor of one backward pass, in elements

Bounds = tuple[Tensor, Tensor]


class Reshape(nn.Module):
    """``x.reshape(batch, *shape)``: the flatten of ``MLP`` / ``CNN`` forwards as a layer."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


# --- the layers in forward order ------------------------------------------------------------
def _unsupported(model: nn.Module) -> str:
    """Leaf layer types of ``model`` that no bound supports (for the error message)."""
    from hdl.models.cnn import Normalize

    ok = (
        nn.Linear,
        nn.Conv2d,
        nn.ReLU,
        nn.Flatten,
        nn.MaxPool2d,
        nn.AvgPool2d,
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.Identity,
        Normalize,
        Reshape,
        *_DROPOUT,
    )
    bad = {
        type(m).__name__
        for m in model.modules()
        if not list(m.children()) and not isinstance(m, ok)
    }
    return ", ".join(sorted(bad))


def sequential_layers(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every layer of ``model`` in forward order, with the reshapes
    its ``forward`` does as :class:`Reshape` layers. ``MLP``, ``CNN`` and ``nn.Sequential``
    only; any other network raises :class:`ConfigError` naming its unsupported layers."""
    from hdl.models.cnn import CNN
    from hdl.models.mlp import MLP

    shape = tuple(int(s) for s in input_shape)
    out: list[tuple[str, nn.Module]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        if isinstance(module, nn.Sequential):
            for name, child in module.named_children():
                walk(child, f"{prefix}.{name}" if prefix else name)
        else:
            out.append((prefix, module))

    if isinstance(model, MLP):
        out.append(("flatten", Reshape((math.prod(shape),))))
        walk(model.body, "body")
        walk(model.head, "head")
    elif isinstance(model, CNN):
        if len(shape) == 2:
            out.append(("unsqueeze", Reshape((1, *shape))))
        walk(model.normalize, "normalize")
        walk(model.features, "features")
        out.append(("flatten", Reshape((math.prod(model.feature_shape),))))
        walk(model.body, "body")
        walk(model.head, "head")
    elif isinstance(model, nn.Sequential):
        walk(model, "")
    else:
        bad = _unsupported(model)
        raise ConfigError(
            f"cannot bound {type(model).__name__}: only MLP, CNN and nn.Sequential networks of "
            f"{SUPPORTED_LAYERS} are supported" + (f" (unsupported layers: {bad})" if bad else "")
        )
    return out


# --- operations ---------------------------------------------------------------------------------
class _Op:
    """One layer of the bounded network, with its per-example input and output shapes."""

    name: str = ""
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def ibp(self, lower: Tensor, upper: Tensor) -> Bounds:
        raise NotImplementedError


class _Affine(_Op):
    """y = L(x) + b with L linear; ``mixing``: L is not elementwise."""

    mixing = True

    def apply(self, x: Tensor) -> Tensor:  # L(x) + b
        raise NotImplementedError

    def apply_abs(self, r: Tensor) -> Tensor:  # |L| r
        raise NotImplementedError

    def transpose(self, a: Tensor) -> Tensor:  # (B, K, *out) -> (B, K, *in): a L
        raise NotImplementedError

    def bias_dot(self, a: Tensor) -> Tensor:  # (B, K, *out) -> (B, K): a . b
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.apply(x)

    def ibp(self, lower: Tensor, upper: Tensor) -> Bounds:
        c, r = (upper + lower) / 2, (upper - lower) / 2
        c, r = self.apply(c), self.apply_abs(r)
        return c - r, c + r


class _Linear(_Affine):
    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.weight = weight
        self.bias = bias if bias is not None else weight.new_zeros(weight.shape[0])

    def apply(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def apply_abs(self, r: Tensor) -> Tensor:
        return F.linear(r, self.weight.abs())

    def transpose(self, a: Tensor) -> Tensor:
        return a @ self.weight

    def bias_dot(self, a: Tensor) -> Tensor:
        return a @ self.bias

    def fold(self, scale: Tensor, shift: Tensor) -> None:
        """Absorb ``y * scale + shift`` applied after this layer (batch norm)."""
        self.weight = self.weight * scale[:, None]
        self.bias = self.bias * scale + shift


class _Conv(_Affine):
    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        stride: tuple[int, int],
        pads: tuple[int, int, int, int],  # top, bottom, left, right
        dilation: tuple[int, int],
        groups: int,
    ) -> None:
        self.weight = weight
        self.bias = bias if bias is not None else weight.new_zeros(weight.shape[0])
        self.stride, self.pads, self.dilation, self.groups = stride, pads, dilation, groups

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        top, bottom, left, right = self.pads
        lead = x.shape[:-3]
        x = x.reshape(-1, *x.shape[-3:])
        if top == bottom and left == right:
            y = F.conv2d(x, weight, bias, self.stride, (top, left), self.dilation, self.groups)
        else:
            x = F.pad(x, (left, right, top, bottom))
            y = F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return y.reshape(*lead, *y.shape[1:])

    def apply(self, x: Tensor) -> Tensor:
        return self._conv(x, self.weight, self.bias)

    def apply_abs(self, r: Tensor) -> Tensor:
        return self._conv(r, self.weight.abs(), None)

    def transpose(self, a: Tensor) -> Tensor:
        b, k = a.shape[:2]
        c_in, h, w = self.in_shape
        top, bottom, left, right = self.pads
        _, h_out, w_out = self.out_shape
        kh, kw = self.weight.shape[-2:]
        padded = (h + top + bottom, w + left + right)
        base = [
            (n - 1) * s + d * (kk - 1) + 1
            for n, s, d, kk in zip(
                (h_out, w_out), self.stride, self.dilation, (kh, kw), strict=True
            )
        ]
        out_pad = tuple(p - q for p, q in zip(padded, base, strict=True))
        x = F.conv_transpose2d(
            a.reshape(b * k, *self.out_shape),
            self.weight,
            None,
            self.stride,
            0,
            out_pad,
            self.groups,
            self.dilation,
        )
        x = x[:, :, top : top + h, left : left + w]
        return x.reshape(b, k, c_in, h, w)

    def bias_dot(self, a: Tensor) -> Tensor:
        return a.sum(dim=(-1, -2)) @ self.bias

    def fold(self, scale: Tensor, shift: Tensor) -> None:
        self.weight = self.weight * scale[:, None, None, None]
        self.bias = self.bias * scale + shift


class _ScaleShift(_Affine):
    """Elementwise y = x * scale + shift (scale, shift broadcast to the example's shape)."""

    mixing = False

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        self.scale, self.shift = scale, shift

    def apply(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift

    def apply_abs(self, r: Tensor) -> Tensor:
        return r * self.scale.abs()

    def transpose(self, a: Tensor) -> Tensor:
        return a * self.scale

    def bias_dot(self, a: Tensor) -> Tensor:
        return (a * self.shift).flatten(2).sum(-1)


class _Relu(_Op):
    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)

    def ibp(self, lower: Tensor, upper: Tensor) -> Bounds:
        return F.relu(lower), F.relu(upper)


class _Reshape(_Op):
    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.out_shape)

    def ibp(self, lower: Tensor, upper: Tensor) -> Bounds:
        return self.forward(lower), self.forward(upper)


class _MaxPool(_Op):
    def __init__(self, module: nn.MaxPool2d) -> None:
        self.kwargs = {
            "kernel_size": module.kernel_size,
            "stride": module.stride,
            "padding": module.padding,
            "dilation": module.dilation,
            "ceil_mode": module.ceil_mode,
        }

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, **self.kwargs)

    def ibp(self, lower: Tensor, upper: Tensor) -> Bounds:  # max is monotone in every input
        return self.forward(lower), self.forward(upper)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_pads(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding of a Conv2d, ``"same"`` as PyTorch pads it."""
    if module.padding == "valid":
        return (0, 0, 0, 0)
    if module.padding == "same":
        pads = []
        for d, k in zip(module.dilation, module.kernel_size, strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    ph, pw = _pair(module.padding)
    return (ph, ph, pw, pw)


def _avg_pool_conv(module: nn.AvgPool2d, channels: int, like: Tensor, name: str) -> _Conv:
    """AvgPool2d as the depthwise convolution it is (zero padding counted, floor mode)."""
    kh, kw = _pair(module.kernel_size)
    stride = _pair(module.stride if module.stride is not None else module.kernel_size)
    ph, pw = _pair(module.padding)
    if module.ceil_mode or module.divisor_override is not None:
        raise ConfigError(f"cannot bound {name} (AvgPool2d with ceil_mode or divisor_override)")
    if (ph or pw) and not module.count_include_pad:
        raise ConfigError(
            f"cannot bound {name} (AvgPool2d with padding and count_include_pad=False)"
        )
    weight = like.new_full((channels, 1, kh, kw), 1.0 / (kh * kw))
    return _Conv(weight, None, stride, (ph, ph, pw, pw), (1, 1), channels)


def _bn_scale_shift(
    module: nn.modules.batchnorm._BatchNorm, stats: Mapping | None, name: str
) -> tuple[Tensor, Tensor]:
    if stats is not None and module in stats:
        mean, var = stats[module]
    elif module.running_mean is not None and not module.training:
        mean, var = module.running_mean, module.running_var
    else:
        raise ConfigError(
            f"cannot bound {name}: batch norm that normalises with batch statistics (train mode "
            "or no running statistics) has no fixed affine map"
        )
    weight = module.weight if module.weight is not None else torch.ones_like(mean)
    bias = module.bias if module.bias is not None else torch.zeros_like(mean)
    scale = weight / torch.sqrt(var.to(weight.dtype) + module.eps)
    return scale, bias - mean.to(weight.dtype) * scale


@dataclass
class BoundNetwork:
    """A network as a chain of operations that the bounds understand."""

    ops: list[_Op]
    input_shape: tuple[int, ...]

    @property
    def relus(self) -> list[tuple[int, str]]:
        """(op index, layer name) of every ReLU."""
        return [(i, op.name) for i, op in enumerate(self.ops) if isinstance(op, _Relu)]

    def forward(self, x: Tensor) -> Tensor:
        for op in self.ops:
            x = op.forward(x)
        return x


def linearize(
    model: nn.Module, input_shape: Sequence[int], batch_stats: Mapping | None = None
) -> BoundNetwork:
    """The chain of operations of ``model`` on inputs of per-example shape ``input_shape``, with
    its effective (masked) weights, batch norm folded into the layer before it (``batch_stats``:
    ``{layer: (mean, biased var)}`` for layers in train mode), dropout dropped. Raises
    :class:`ConfigError` naming the first layer it cannot bound."""
    from hdl.models.cnn import Normalize

    shape = tuple(int(s) for s in input_shape)
    ops: list[_Op] = []
    like: Tensor | None = next(iter(model.parameters()), None)
    if like is None:
        like = torch.zeros(())
    for name, m in sequential_layers(model, shape):
        op: _Op | None = None
        if isinstance(m, _DROPOUT + (nn.Identity,)):
            continue
        if isinstance(m, nn.Linear):
            if len(shape) != 1:
                raise ConfigError(f"cannot bound {name}: Linear on inputs of shape {shape}")
            op = _Linear(m.weight, m.bias)
        elif isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros" or len(shape) != 3:
                raise ConfigError(
                    f"cannot bound {name}: Conv2d needs zero padding and (C, H, W) inputs"
                )
            op = _Conv(
                m.weight, m.bias, _pair(m.stride), _conv_pads(m), _pair(m.dilation), m.groups
            )
        elif type(m) is nn.ReLU:
            op = _Relu()
        elif isinstance(m, (nn.Flatten, Reshape)):
            if isinstance(m, nn.Flatten) and (m.start_dim != 1 or m.end_dim != -1):
                raise ConfigError(f"cannot bound {name}: Flatten must flatten dims 1..-1")
            target = m.shape if isinstance(m, Reshape) else (math.prod(shape),)
            op = _Reshape()
            op.out_shape = tuple(target)
        elif isinstance(m, Normalize):
            scale = (1.0 / m.std).reshape(-1, 1, 1)
            op = _ScaleShift(scale, (-m.mean / m.std).reshape(-1, 1, 1))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            scale, shift = _bn_scale_shift(m, batch_stats, name)
            last = ops[-1] if ops else None
            if isinstance(last, (_Linear, _Conv)):
                last.fold(scale, shift)  # exact: batch norm in eval mode is affine per channel
                last.name = f"{last.name}+{name}"
                continue
            view = (-1,) if len(shape) == 1 else (-1, 1, 1)
            op = _ScaleShift(scale.reshape(view), shift.reshape(view))
        elif isinstance(m, nn.MaxPool2d):
            if m.return_indices:
                raise ConfigError(f"cannot bound {name}: MaxPool2d with return_indices")
            op = _MaxPool(m)
        elif isinstance(m, nn.AvgPool2d):
            op = _avg_pool_conv(m, shape[0], like, name)
        else:
            raise ConfigError(
                f"cannot bound layer {name or '0'} ({type(m).__name__}): supported layers are "
                f"{SUPPORTED_LAYERS}"
            )
        op.name = name
        op.in_shape = shape
        if not isinstance(op, _Reshape):
            with torch.no_grad():
                probe = like.new_zeros((1, *shape))
                op.out_shape = tuple(op.forward(probe).shape[1:])
        elif math.prod(op.out_shape) != math.prod(shape):
            raise ConfigError(f"cannot bound {name}: reshape of {shape} to {op.out_shape}")
        shape = op.out_shape
        ops.append(op)
    if not ops:
        raise ConfigError("cannot bound a network without layers")
    return BoundNetwork(ops, tuple(int(s) for s in input_shape))


# --- the ball, the margins --------------------------------------------------------------------
def input_box(x: Tensor, eps: float, input_range: Sequence[float] | None = None) -> Bounds:
    """Per-coordinate bounds of {x' : ||x' - x||_inf <= eps} ∩ [lo, hi] (None: unbounded); the
    box is widened per coordinate to hold x itself (a clean input outside the range is still
    the centre of its own ball)."""
    lower, upper = x - eps, x + eps
    if input_range is not None:
        lo, hi = (float(v) for v in input_range)
        lower = torch.maximum(lower, x.clamp(max=lo))
        upper = torch.minimum(upper, x.clamp(min=hi))
    return lower, upper


def margin_spec(y: Tensor, num_outputs: int, dtype=torch.float32) -> Tensor:
    """(B, K, num_outputs) matrix C with C z = (z_y - z_i for every class i != y), in the class
    logits of :func:`hdl.attacks.class_logits` (one output z means logits [0, z])."""
    y = y.long()
    if num_outputs == 1:
        return torch.where(y == 1, 1.0, -1.0).to(dtype).reshape(-1, 1, 1)
    eye = torch.eye(num_outputs, dtype=dtype, device=y.device)
    classes = torch.arange(num_outputs, device=y.device).expand(len(y), -1)
    others = classes[classes != y[:, None]].reshape(len(y), num_outputs - 1)
    return eye[y][:, None, :] - eye[others]


def _spec_lower(op: _Op, bounds: Bounds, spec: Tensor) -> Tensor:
    """Interval lower bound of ``spec @ op(h)`` for h in the box ``bounds`` (the input of the
    last op); a last Linear layer is merged with the spec first."""
    lower, upper = bounds
    if isinstance(op, _Linear):
        c, r = ((upper + lower) / 2).flatten(1), ((upper - lower) / 2).flatten(1)
        w = spec @ op.weight  # (B, K, d)
        return (
            torch.einsum("bkd,bd->bk", w, c)
            + spec @ op.bias
            - torch.einsum("bkd,bd->bk", w.abs(), r)
        )
    lower, upper = op.ibp(lower, upper)
    pos, neg = spec.clamp(min=0), spec.clamp(max=0)
    return torch.einsum("bko,bo->bk", pos, lower.flatten(1)) + torch.einsum(
        "bko,bo->bk", neg, upper.flatten(1)
    )


# --- IBP --------------------------------------------------------------------------------------
def ibp_bounds(net: BoundNetwork, lower: Tensor, upper: Tensor) -> list[Bounds]:
    """Interval bounds of the input of every op and of the output (len(ops) + 1 boxes)."""
    boxes = [(lower, upper)]
    for op in net.ops:
        boxes.append(op.ibp(*boxes[-1]))
    return boxes


def ibp_margins(net: BoundNetwork, lower: Tensor, upper: Tensor, spec: Tensor) -> Tensor:
    """IBP lower bounds (B, K) of the margins ``spec @ z`` over the box [lower, upper]."""
    box = (lower, upper)
    for op in net.ops[:-1]:
        box = op.ibp(*box)
    return _spec_lower(net.ops[-1], box, spec)


# --- CROWN ------------------------------------------------------------------------------------
def _relu_relaxation(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(lower slope, upper slope, upper intercept) of the ReLU's linear relaxation on [l, u]:
    chord above, adaptive alpha z below (alpha = 1 iff u > -l) for unstable units."""
    active = lower >= 0
    unstable = (lower < 0) & (upper > 0)
    denom = torch.where(unstable, upper - lower, torch.ones_like(upper))
    chord = upper / denom
    one, zero = torch.ones_like(upper), torch.zeros_like(upper)
    up_slope = torch.where(active, one, torch.where(unstable, chord, zero))
    up_icpt = torch.where(unstable, -chord * lower, zero)
    lo_slope = torch.where(active, one, torch.where(unstable & (upper > -lower), one, zero))
    return lo_slope, up_slope, up_icpt


def _backward(
    net: BoundNetwork, a: Tensor, end: int, start: int, boxes: Sequence[Bounds | None]
) -> tuple[Tensor, Tensor]:
    """Linear lower bound of ``a . v_end`` (v_k: the input of op k; a: (B, K, *shape)) as
    ``a' . v_start + bias``, back-substituted through ops end-1 ... start."""
    bias = a.new_zeros(a.shape[:2])
    for i in range(end - 1, start - 1, -1):
        op = net.ops[i]
        if isinstance(op, _Affine):
            bias = bias + op.bias_dot(a)
            a = op.transpose(a)
        elif isinstance(op, _Relu):
            lo_slope, up_slope, up_icpt = (t.unsqueeze(1) for t in _relu_relaxation(*boxes[i]))
            pos, neg = a.clamp(min=0), a.clamp(max=0)
            bias = bias + (neg * up_icpt).flatten(2).sum(-1)
            a = pos * lo_slope + neg * up_slope
        elif isinstance(op, _Reshape):
            a = a.reshape(*a.shape[:2], *op.in_shape)
        else:  # pragma: no cover - segments never contain a max-pool
            raise AssertionError(f"backward pass through {type(op).__name__}")
    return a, bias


def _concretize(a: Tensor, bias: Tensor, box: Bounds) -> Tensor:
    """min of ``a . v + bias`` over the box of v."""
    lower, upper = box
    c, r = ((upper + lower) / 2).unsqueeze(1), ((upper - lower) / 2).unsqueeze(1)
    return (a * c).flatten(2).sum(-1) + bias - (a.abs() * r).flatten(2).sum(-1)


@dataclass
class CrownResult:
    margins: Tensor  # (B, K) lower bounds of the margins
    boxes: list[Bounds] = field(default_factory=list)  # bounds of the input of every op
    ibp_margins: Tensor | None = None  # the interval margins from the same boxes


def _needs_backward(net: BoundNetwork, start: int, k: int) -> bool:
    """Whether CROWN can tighten the box of v_k over interval arithmetic: the op before k is
    affine and the segment holds a ReLU or two non-elementwise affine ops (one affine map of a
    box is bounded exactly by intervals)."""
    if not isinstance(net.ops[k - 1], _Affine):
        return False
    span = net.ops[start:k]
    mixing = sum(isinstance(op, _Affine) and op.mixing for op in span)
    return any(isinstance(op, _Relu) for op in span) or mixing >= 2


def _tighten(
    net: BoundNetwork, k: int, start: int, boxes: list[Bounds], only_unstable: bool
) -> Bounds:
    """CROWN bounds of v_k (the input of op k) intersected with its current box; only for the
    units the box leaves unstable (``only_unstable``), in chunks that bound the memory."""
    lower, upper = boxes[k]
    b = lower.shape[0]
    flat_l, flat_u = lower.flatten(1).clone(), upper.flatten(1).clone()
    if only_unstable:
        idx = ((flat_l < 0) & (flat_u > 0)).any(dim=0).nonzero().flatten()
    else:
        idx = torch.arange(flat_l.shape[1], device=lower.device)
    if idx.numel() == 0:
        return lower, upper
    widest = max(math.prod(op.in_shape) for op in net.ops[start:k])
    chunk = max(1, _CHUNK_ELEMENTS // max(1, 2 * b * widest))
    shape = net.ops[k].in_shape
    for part in idx.split(chunk):
        m = part.numel()
        a = lower.new_zeros(b, 2 * m, flat_l.shape[1])
        rows = torch.arange(m, device=lower.device)
        a[:, rows, part] = 1.0
        a[:, rows + m, part] = -1.0
        a_start, bias = _backward(net, a.reshape(b, 2 * m, *shape), k, start, boxes)
        bound = _concretize(a_start, bias, boxes[start])
        flat_l[:, part] = torch.maximum(flat_l[:, part], bound[:, :m])
        flat_u[:, part] = torch.minimum(flat_u[:, part], -bound[:, m:])
    return flat_l.reshape(lower.shape), flat_u.reshape(upper.shape)


def crown_margins(
    net: BoundNetwork,
    lower: Tensor,
    upper: Tensor,
    spec: Tensor,
    *,
    intermediate: str = "crown",
    tighten_with_ibp: bool = True,
) -> CrownResult:
    """CROWN lower bounds (B, K) of the margins ``spec @ z`` over the box [lower, upper].

    ``intermediate="crown"``: every ReLU's (and max-pool's) input box is tightened by CROWN
    (verification); ``"ibp"``: interval bounds only (CROWN-IBP). ``tighten_with_ibp``: report
    the larger of the back-substituted bound and the interval bound of the margins from the
    same boxes (both sound; never looser than IBP). The returned boxes are those of the input
    of every op (the ReLUs' pre-activation bounds)."""
    if intermediate not in ("crown", "ibp"):
        raise ValueError(f"intermediate must be crown or ibp, got {intermediate!r}")
    ops = net.ops
    n = len(ops)
    boxes: list[Bounds] = [(lower, upper)]
    start = 0  # the segment's first op: 0 or the op after the last max-pool
    for k in range(1, n):
        boxes.append(ops[k - 1].ibp(*boxes[k - 1]))
        if isinstance(ops[k - 1], _MaxPool):
            start = k
        if (
            intermediate == "crown"
            and isinstance(ops[k], (_Relu, _MaxPool))
            and _needs_backward(net, start, k)
        ):
            boxes[k] = _tighten(net, k, start, boxes, only_unstable=isinstance(ops[k], _Relu))
    last = ops[-1]
    b, k_rows = spec.shape[:2]
    if isinstance(last, _Linear):  # the margins are one affine map of the last hidden layer
        a = (spec @ last.weight).reshape(b, k_rows, *last.in_shape)
        bias0, end = spec @ last.bias, n - 1
    else:
        boxes.append(last.ibp(*boxes[-1]))
        if isinstance(last, _MaxPool):
            start = n
        a = spec.reshape(b, k_rows, *last.out_shape)
        bias0, end = spec.new_zeros(b, k_rows), n
    a_start, bias = _backward(net, a, end, start, boxes)
    margins = _concretize(a_start, bias + bias0, boxes[start])
    interval = _spec_lower(last, boxes[n - 1], spec)
    if tighten_with_ibp:
        margins = torch.maximum(margins, interval)
    return CrownResult(margins, boxes[:n], interval)


def unstable_counts(net: BoundNetwork, boxes: Sequence[Bounds]) -> dict[str, Tensor]:
    """Per ReLU layer: the number of unstable units (l < 0 < u) of each example, shape (B,)."""
    out = {}
    for i, name in net.relus:
        lower, upper = boxes[i]
        out[name] = ((lower < 0) & (upper > 0)).flatten(1).sum(1)
    return out


# --- one call: certified margins of a model -----------------------------------------------------
def certify(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    method: str = "crown",
    input_range: Sequence[float] | None = None,
    net: BoundNetwork | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Margin lower bounds (B, K) by ``ibp`` or ``crown`` and, for CROWN, the unstable ReLUs
    per layer of each example. A point is certified when all its margins are > 0 (and it is
    classified correctly, which a positive margin at eps >= 0 implies)."""
    if method not in BOUND_METHODS:
        raise ConfigError(f"bound method must be one of {', '.join(BOUND_METHODS)}, got {method!r}")
    net = net if net is not None else linearize(model, x.shape[1:])
    with torch.no_grad():
        num_outputs = net.ops[-1].out_shape[0]
        spec = margin_spec(y, num_outputs, x.dtype).to(x.device)
        lower, upper = input_box(x, float(eps), input_range)
        if method == "ibp":
            return ibp_margins(net, lower, upper, spec), {}
        result = crown_margins(net, lower, upper, spec)
        return result.margins, unstable_counts(net, result.boxes)


# --- certified training -------------------------------------------------------------------------
def ramp(step: int, ramp_steps: int) -> float:
    """Training progress of the eps ramp: ``step / ramp_steps`` clamped to [0, 1] (1 at once
    when ``ramp_steps`` is 0)."""
    if ramp_steps <= 0:
        return 1.0
    return min(max(float(step) / float(ramp_steps), 0.0), 1.0)


def worst_case_cross_entropy(margins: Tensor) -> Tensor:
    """Cross-entropy of the worst-case logits: logit 0 for the label and -m_i for class i
    (their margin lower bounds): ``log(1 + sum_i exp(-m_i))`` per example, shape (B,)."""
    zeros = margins.new_zeros(margins.shape[0], 1)
    return torch.logsumexp(torch.cat([zeros, -margins], dim=1), dim=1)


def _forward_recording_batch_norm(model: nn.Module, x: Tensor) -> tuple[Tensor, dict]:
    """``model(x)`` and, for every batch-norm layer that normalises with the batch, the batch
    mean and biased variance it used (the bounds use the same affine map)."""
    from hdl.batchnorm import _batch_statistics, batch_statistics_layers

    layers = batch_statistics_layers(model)
    stats: dict = {}
    if not layers:
        return model(x), stats

    def record(module: nn.Module, args: tuple) -> None:
        stats[module] = _batch_statistics(module, args[0])

    handles = [m.register_forward_pre_hook(record) for m in layers]
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return out, stats


def certified_cross_entropy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    method: str = "ibp",
    kappa: float = 0.5,
    progress: float = 1.0,
    input_range: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-example certified training loss and the natural logits (Gowal et al. 2018; Zhang et
    al. 2020): ``k * CE(z(x), y) + (1 - k) * CE(worst-case logits over the eps-ball)``.

    With ``progress`` p in [0, 1] (the eps ramp): the radius is ``p * eps``, the natural weight
    ``k = 1 - (1 - kappa) * p`` (from 1 down to ``kappa``) and, for ``crown_ibp``, the margins
    are ``b * CROWN-IBP + (1 - b) * IBP`` with ``b = 1 - p``. The worst-case CE is >= the
    natural CE (the bounds are sound and x is in its ball), so the loss is too."""
    if method not in CERTIFIED_METHODS:
        raise ConfigError(
            f"loss.robust.method: certified training is {' or '.join(CERTIFIED_METHODS)}, got {method!r}"
        )
    logits, stats = _forward_recording_batch_norm(model, x)
    natural = F.cross_entropy(_class_logits(logits), y, reduction="none")
    eps_t = float(eps) * progress
    if eps_t <= 0:
        return natural, logits
    net = linearize(model, x.shape[1:], batch_stats=stats)
    spec = margin_spec(y, logits.shape[1] if logits.dim() == 2 else 1, logits.dtype).to(x.device)
    lower, upper = input_box(x, eps_t, input_range)
    if method == "ibp":
        margins = ibp_margins(net, lower, upper, spec)
    else:
        result = crown_margins(net, lower, upper, spec, intermediate="ibp", tighten_with_ibp=False)
        beta = 1.0 - progress
        margins = beta * result.margins + (1.0 - beta) * result.ibp_margins
    k = 1.0 - (1.0 - float(kappa)) * progress
    return k * natural + (1.0 - k) * worst_case_cross_entropy(margins), logits


def _class_logits(out: Tensor) -> Tensor:
    from hdl.attacks import class_logits

    return class_logits(out)
