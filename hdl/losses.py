"""The composite holistic loss: (robust) cross-entropy, stability over training subsets, sparsity.

Math (docs/loss.md): for logits z = f(x) and d_i = z_i - z_y, the first-order worst case over an
l_p ball of radius eps is d_i + eps * ||grad_x d_i||_q (q the dual norm), and

    robust CE  = log sum_i exp(d_i + eps ||grad_x d_i||_q)     (the i = y term is 0)
    stable     = theta + mean_b relu(l_b - theta) / ratio       (CVaR at level ratio)
    total      = mean_or_stable(l_b) + l0 * mean(masks) + l2 * ||w * m||^2

Under batch norm in train mode, grad_x d_i is that of each example's own function with the batch
statistics held fixed: mean and variance are the batch's (they carry the weight gradient, the
running statistics move once) but the input gradient does not flow through them (hdl.batchnorm).

Every term is present in every combination; all off is plain cross-entropy, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hdl.attacks import ADVERSARIAL_METHODS
from hdl.batchnorm import per_example_forward
from hdl.bounds import CERTIFIED_METHODS
from hdl.errors import ConfigError
from hdl.norms import norm_value
from hdl.sparsity import SparseConfig

NORM_KEY = "loss.robust.norm"


def dual_norm(g: Tensor, p: float) -> Tensor:
    """||g||_q over the last dimension, q the dual of p (inf -> 1, 2 -> 2, 1 -> inf)."""
    if p == math.inf:
        return g.abs().sum(-1)
    if p == 2.0:
        # sqrt has an infinite derivative at 0 (e.g. d_y); a tiny floor keeps the graph finite
        return g.pow(2).sum(-1).clamp_min(1e-24).sqrt()
    return g.abs().amax(-1)


def _uses_rnn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.RNNBase) for m in model.modules())


def _double_backward_context(model: nn.Module):
    """cuDNN RNNs have no double backward: run their forward with cuDNN off for this term."""
    return torch.backends.cudnn.flags(enabled=False) if _uses_rnn(model) else nullcontext()


def _batched_input_vjp(out: Tensor, x: Tensor, vectors: Tensor) -> Tensor:
    """VJPs of ``out`` (B, C) w.r.t. ``x`` for K cotangents ``vectors`` (K, B, C) -> (K, B, *x).

    Examples are independent (under batch norm in train mode made so by
    :func:`hdl.batchnorm.per_example_forward`), so the VJP with a (B, C) cotangent gives every
    example's row-combination of its own Jacobian at once: K backward passes for the whole
    batch, run as one vmapped pass. The graph is kept (create_graph) so the loss trains.
    """
    try:
        (grads,) = torch.autograd.grad(
            out, x, grad_outputs=vectors, is_grads_batched=True, create_graph=True
        )
        return grads
    except RuntimeError:  # an op without a batching rule: fall back to K separate passes
        rows = [
            torch.autograd.grad(out, x, grad_outputs=v, create_graph=True, retain_graph=True)[0]
            for v in vectors
        ]
        return torch.stack(rows)


def robust_cross_entropy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    norm: Any = math.inf,
    top_k: int | None = None,
    logits: Tensor | None = None,
) -> Tensor:
    """Per-example first-order robust cross-entropy, shape (B,).

    ``top_k=None`` is exact (all C - 1 classes other than y get the gradient term). ``top_k=k``
    is an approximation: only the k classes with the largest gap d_i get it, the others keep
    their natural gap, so the result is still >= cross-entropy (and exact for k >= C - 1).
    Pass ``logits`` only together with an ``x`` that requires grad and produced them (through
    :func:`hdl.batchnorm.per_example_forward`, so batch norm in train mode stays per example).
    ``eps`` may be a (B,) tensor: one radius per example (the members of a stacked job).
    """
    per_example_eps = isinstance(eps, Tensor)  # one radius per example (stacked members)
    if not per_example_eps and eps < 0:
        raise ConfigError(f"loss.robust.eps must be >= 0, got {eps!r}")
    p = norm_value(norm, NORM_KEY)
    if not per_example_eps and eps == 0:
        z = model(x) if logits is None else logits
        return F.cross_entropy(z, y, reduction="none")
    if logits is None:
        x = x.detach().requires_grad_(True)
        with _double_backward_context(model):
            logits = per_example_forward(model, x)
    z = logits
    batch, classes = z.shape
    gaps = z - z.gather(1, y[:, None])  # d_i, with d_y = 0
    k = classes - 1 if top_k is None else min(int(top_k), classes - 1)
    if k < 1:
        raise ConfigError(f"loss.robust.top_k must be >= 1, got {top_k!r}")
    others = gaps.detach().scatter(1, y[:, None], -math.inf)
    idx = others.topk(k, dim=1).indices  # (B, k): the classes that get the gradient term
    # cotangents e_i - e_y for each rank r: (k, B, C)
    vectors = torch.zeros(k, batch, classes, dtype=z.dtype, device=z.device)
    vectors.scatter_(2, idx.T.unsqueeze(-1), 1.0)
    vectors.scatter_(2, y.expand(k, batch).unsqueeze(-1), -1.0)
    with _double_backward_context(model):
        grads = _batched_input_vjp(z, x, vectors)  # (k, B, *input)
    penalty = eps * dual_norm(grads.flatten(2), p)  # (k, B)
    worst = gaps.scatter_add(1, idx, penalty.T)
    return torch.logsumexp(worst, dim=1)


def robust_squared_error(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: Any = math.inf
) -> Tensor:
    """Per-example first-order worst squared error: (|y - f(x)| + eps ||grad_x f||_q)^2, (B,)."""
    if eps < 0:
        raise ConfigError(f"loss.robust.eps must be >= 0, got {eps!r}")
    p = norm_value(norm, NORM_KEY)
    if eps == 0:
        return (model(x).reshape(-1) - y.reshape(-1)).pow(2)
    x = x.detach().requires_grad_(True)
    with _double_backward_context(model):
        pred = per_example_forward(model, x).reshape(-1)
        (grad,) = torch.autograd.grad(pred.sum(), x, create_graph=True)
    residual = (y.reshape(-1) - pred).abs()
    return (residual + eps * dual_norm(grad.flatten(1), p)).pow(2)


def stable_loss(per_example_loss: Tensor, theta: Tensor, ratio: float | Tensor) -> Tensor:
    """theta + mean(relu(l - theta)) / ratio: the loss on the worst ``ratio`` fraction of the batch.

    By LP duality its minimum over theta is the CVaR at level ``ratio`` of the B losses, with a
    fractional last example: for sorted losses l_(1) >= l_(2) >= ... and m = ratio * B, it is

        ( l_(1) + ... + l_(k) + (m - k) * l_(k+1) ) / m,    k = floor(m),

    the mean of the m largest losses when m is an integer (and not, in general, the mean of the
    ceil(m) largest). It is separable over examples, so it stays correct under DDP without a
    gather (docs/loss.md, "The stability term").

    Leading dimensions are members (hdl.stacked): losses (N, B), theta and ratio (N,) give the
    N members' terms, (N,).
    """
    if not isinstance(ratio, Tensor) and not 0.0 < ratio <= 1.0:
        raise ConfigError(f"loss.stable.ratio must be in (0, 1], got {ratio!r}")
    theta = torch.as_tensor(theta, dtype=per_example_loss.dtype, device=per_example_loss.device)
    return theta + F.relu(per_example_loss - theta[..., None]).mean(-1) / ratio


# --- configuration of the composite loss ---------------------------------------------------


@dataclass
class RobustConfig:
    eps: float = 0.0
    norm: Any = "inf"
    top_k: int | None = None
    method: str = "first_order"  # first_order | an attack name for adversarial training
    steps: int = 7  # adversarial training: attack steps
    step_size: float | None = None
    # certified training (method ibp | crown_ibp; hdl/bounds.py, docs/verification.md):
    kappa: float = 0.5  # final weight of the natural CE, kappa * CE_nat + (1 - kappa) * CE_cert
    ramp_steps: int = 0  # training steps over which eps grows linearly from 0 (0: no ramp)

    @property
    def enabled(self) -> bool:
        return self.eps > 0


@dataclass
class StableConfig:
    ratio: float | None = None  # None: off (plain mean over the batch)
    theta_init: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.ratio is not None


def _build(cls: type, values: Mapping | None, key: str):
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{key}.{unknown[0]} is not a known key (known: {', '.join(sorted(known))})"
        )
    return cls(**values)


def _check_loss_values(robust: RobustConfig, stable: StableConfig, sparse: SparseConfig, l2: float):
    if robust.eps is None or float(robust.eps) < 0:
        raise ConfigError(f"loss.robust.eps must be >= 0, got {robust.eps!r}")
    norm_value(robust.norm, NORM_KEY)
    if robust.top_k is not None and int(robust.top_k) < 1:
        raise ConfigError(f"loss.robust.top_k must be >= 1 or null, got {robust.top_k!r}")
    methods = (*ADVERSARIAL_METHODS, *CERTIFIED_METHODS)
    if robust.method != "first_order" and robust.method not in methods:
        raise ConfigError(
            f"loss.robust.method must be first_order or one of {', '.join(methods)}, "
            f"got {robust.method!r}"
        )
    if robust.method in CERTIFIED_METHODS:
        if norm_value(robust.norm, NORM_KEY) != math.inf:
            raise ConfigError(
                f"loss.robust.norm must be inf for certified training ({robust.method}), "
                f"got {robust.norm!r}"
            )
        if not 0.0 <= float(robust.kappa) <= 1.0:
            raise ConfigError(f"loss.robust.kappa must be in [0, 1], got {robust.kappa!r}")
        if int(robust.ramp_steps) < 0:
            raise ConfigError(f"loss.robust.ramp_steps must be >= 0, got {robust.ramp_steps!r}")
    if int(robust.steps) < 1:
        raise ConfigError(f"loss.robust.steps must be >= 1, got {robust.steps!r}")
    if stable.ratio is not None and not 0.0 < float(stable.ratio) <= 1.0:
        raise ConfigError(f"loss.stable.ratio must be in (0, 1], got {stable.ratio!r}")
    sparse.check()
    if float(l2) < 0:
        raise ConfigError(f"loss.l2 must be >= 0, got {l2!r}")


@dataclass
class LossOutput:
    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    logits: Tensor | None = None  # natural logits / predictions of the batch (for metrics)


class HolisticLoss(nn.Module):
    """The composite loss, built from the ``loss`` config block; works for any ``nn.Module``.

    ``theta`` (the stability term's dual variable) is a parameter of this module, so it is
    optimised, checkpointed and kept identical across DDP ranks like any weight.
    """

    def __init__(
        self,
        task: str = "classification",
        robust: Mapping | None = None,
        stable: Mapping | None = None,
        sparse: Mapping | None = None,
        l2: float = 0.0,
        name: str | None = None,
        input_range: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        if task not in ("classification", "regression"):
            raise ConfigError(f"task must be classification or regression, got {task!r}")
        self.task = task
        self.name = name
        self.robust = _build(RobustConfig, robust, "loss.robust")
        self.stable = _build(StableConfig, stable, "loss.stable")
        self.sparse = _build(SparseConfig, sparse, "loss.sparse")
        self.l2 = float(l2)
        _check_loss_values(self.robust, self.stable, self.sparse, self.l2)
        self.input_range = input_range
        self.theta = (
            nn.Parameter(torch.tensor(float(self.stable.theta_init)))
            if self.stable.enabled
            else None
        )
        if self.robust.method in CERTIFIED_METHODS:  # training progress of the eps ramp
            self.register_buffer("cert_step", torch.zeros((), dtype=torch.long))

    @property
    def is_baseline(self) -> bool:
        return not (self.robust.enabled or self.stable.enabled or self.sparse.enabled or self.l2)

    def per_example(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per-example (robust) loss and the natural logits/predictions of the batch.

        ``eps`` (B,) replaces ``loss.robust.eps`` with one radius per example (the members of a
        stacked job, hdl.stacked); first-order robust term only."""
        r = self.robust
        radius = float(r.eps) if eps is None else eps
        if self.task == "classification":
            if r.enabled and r.method in CERTIFIED_METHODS:  # IBP / CROWN-IBP (hdl/bounds.py)
                from hdl.bounds import certified_cross_entropy, ramp

                per, logits = certified_cross_entropy(
                    model,
                    x,
                    y,
                    eps=float(r.eps),
                    method=r.method,
                    kappa=float(r.kappa),
                    progress=ramp(int(self.cert_step), int(r.ramp_steps)),
                    input_range=self.input_range,
                )
                if self.training:
                    self.cert_step += 1
                return per, logits
            if r.enabled and r.method != "first_order":
                from hdl.attacks import perturb  # adversarial training: loss on attacked inputs

                x_adv = perturb(
                    model,
                    x,
                    y,
                    eps=float(r.eps),
                    attack=r.method,
                    norm=r.norm,
                    steps=int(r.steps),
                    step_size=r.step_size,
                    input_range=self.input_range,
                )
                both = model(torch.cat([x, x_adv]))
                logits, adv_logits = both[: len(x)], both[len(x) :]
                return F.cross_entropy(adv_logits, y, reduction="none"), logits
            if r.enabled:
                xg = x.detach().requires_grad_(True)
                with _double_backward_context(model):
                    logits = per_example_forward(model, xg)
                per = robust_cross_entropy(model, xg, y, radius, r.norm, r.top_k, logits=logits)
                return per, logits
            logits = model(x)
            return F.cross_entropy(logits, y, reduction="none"), logits
        if r.enabled and r.method != "first_order":
            raise ConfigError(
                "loss.robust.method: adversarial training supports classification only"
            )
        if r.enabled:
            xg = x.detach().requires_grad_(True)
            with _double_backward_context(model):
                pred = per_example_forward(model, xg).reshape(-1)
                (grad,) = torch.autograd.grad(pred.sum(), xg, create_graph=True)
            residual = (y.reshape(-1) - pred).abs()
            per = (
                residual + radius * dual_norm(grad.flatten(1), norm_value(r.norm, NORM_KEY))
            ).pow(2)
            return per, pred
        pred = model(x).reshape(-1)
        return (pred - y.reshape(-1)).pow(2), pred

    def compute(self, model: nn.Module, x: Tensor, y: Tensor) -> LossOutput:
        if self.task == "classification" and not (self.robust.enabled or self.stable.enabled):
            logits = model(x)
            data_loss = F.cross_entropy(logits, y)  # the baseline: plain CE, bit for bit
            terms = {"ce": data_loss.detach()}
        else:
            per, logits = self.per_example(model, x, y)
            natural = (
                F.cross_entropy(logits.detach(), y)
                if self.task == "classification"
                else F.mse_loss(logits.detach(), y.reshape(-1))
            )
            terms = {"ce" if self.task == "classification" else "mse": natural}
            if self.robust.enabled:
                terms["robust"] = per.detach().mean()
            if self.stable.enabled:
                data_loss = stable_loss(per, self.theta, float(self.stable.ratio))
                terms["stable"] = data_loss.detach()
                terms["theta"] = self.theta.detach()
            else:
                data_loss = per.mean()
        total = data_loss
        if self.sparse.enabled:
            from hdl.sparsity import l0_penalty

            mask_mean = l0_penalty(model)
            total = total + self.sparse.l0 * mask_mean
            terms["l0"] = mask_mean.detach()
        if self.l2:
            sq = weight_norm_sq(model)
            total = total + self.l2 * sq
            terms["l2"] = sq.detach()
        terms["total"] = total.detach()
        return LossOutput(total, terms, logits)

    def forward(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.compute(model, x, y)
        return out.total, out.terms


def weight_norm_sq(model: nn.Module, members: int | None = None) -> Tensor:
    """Squared l2 norm of the network's **effective** weight tensors: the weights of its Linear,
    Conv and RNN layers as the forward pass uses them (``w * m`` under a sparsity mask), biases
    and normalisation parameters excluded.

    The penalty is on what the network computes with: a pruned weight costs nothing (its raw
    value behind a zero mask is irrelevant), and, as usual for weight decay, biases and
    batch-norm scales are not penalised (docs/loss.md, "The total"). ``members``: the tensors
    are stacked along a leading member dimension (hdl.stacked); (members,) norms."""
    from hdl.sparsity import _weight_modules, member_sum

    squares = [
        member_sum(getattr(module, name).pow(2), members)
        for _, module, name in _weight_modules(model)
    ]
    if not squares:
        shape = () if members is None else (members,)
        return torch.zeros(shape, device=next(iter(model.parameters()), torch.zeros(())).device)
    return torch.stack(squares).sum(0)
