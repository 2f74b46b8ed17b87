"""Candidate implementations of the exact first-order robust cross-entropy, for ``hdl-bench``.

They all compute the same quantity as :func:`hdl.losses.robust_cross_entropy` with
``top_k=None`` (the bench checks that they agree on the batch) and differ only in how the
input-Jacobian rows of the logits are obtained:

- ``diff_batched``: the library's choice: C - 1 cotangents e_i - e_y, one vmapped
  (``is_grads_batched``) backward pass;
- ``diff_loop``: the same C - 1 cotangents, one ``autograd.grad`` call each;
- ``class_loop``: one VJP per class of the batch-summed logit (C calls), then J_i - J_y;
- ``class_batched``: the same C one-hot cotangents in one vmapped pass;
- ``func_jacrev``: ``torch.func.jacrev`` of the batch-summed logits (C, B, *x);
- ``func_vmap``: ``torch.func.vmap(jacrev(f))`` over single examples;
- ``compiled``: ``torch.compile(model)`` with ``diff_loop`` (torch.compile has no double
  backward through its graphs; the bench records the error it raises).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from hdl.losses import dual_norm, robust_cross_entropy

ExactFn = Callable[[nn.Module, Tensor, Tensor, float, float], Tensor]


def _gaps(z: Tensor, y: Tensor) -> Tensor:
    return z - z.gather(1, y[:, None])


def _diff_vectors(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Cotangents e_i - e_y for the C - 1 classes i != y: (C - 1, B, C), and their classes."""
    batch, classes = z.shape
    others = torch.zeros_like(z).scatter(1, y[:, None], -math.inf)
    idx = others.topk(classes - 1, dim=1).indices  # every class but y, in some order
    vectors = torch.zeros(classes - 1, batch, classes, dtype=z.dtype, device=z.device)
    vectors.scatter_(2, idx.T.unsqueeze(-1), 1.0)
    vectors.scatter_(2, y.expand(classes - 1, batch).unsqueeze(-1), -1.0)
    return vectors, idx


def _from_diff_grads(z: Tensor, y: Tensor, grads: Tensor, idx: Tensor, eps: float, p: float):
    penalty = eps * dual_norm(grads.flatten(2), p)  # (C - 1, B)
    return torch.logsumexp(_gaps(z, y).scatter_add(1, idx, penalty.T), dim=1)


def _from_rows(z: Tensor, y: Tensor, rows: Tensor, eps: float, p: float) -> Tensor:
    """rows: (B, C, D) input-Jacobian of every example; d_y's row is J_y - J_y = 0."""
    jy = rows.gather(1, y[:, None, None].expand(-1, 1, rows.shape[2]))
    penalty = eps * dual_norm(rows - jy, p)
    penalty = penalty.scatter(1, y[:, None], 0.0)
    return torch.logsumexp(_gaps(z, y) + penalty, dim=1)


def _forward(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    xg = x.detach().requires_grad_(True)
    return xg, model(xg)


def diff_batched(model: nn.Module, x: Tensor, y: Tensor, eps: float, p: float) -> Tensor:
    return robust_cross_entropy(model, x, y, eps, p)


def diff_loop(model: nn.Module, x: Tensor, y: Tensor, eps: float, p: float) -> Tensor:
    xg, z = _forward(model, x)
    vectors, idx = _diff_vectors(z, y)
    grads = [
        torch.autograd.grad(z, xg, grad_outputs=v, create_graph=True, retain_graph=True)[0]
        for v in vectors
    ]
    return _from_diff_grads(z, y, torch.stack(grads), idx, eps, p)


def class_loop(model: nn.Module, x: Tensor, y: Tensor, eps: float, p: float) -> Tensor:
    xg, z = _forward(model, x)
    rows = [
        torch.autograd.grad(z[:, c].sum(), xg, create_graph=True, retain_graph=True)[0]
        for c in range(z.shape[1])
    ]
    return _from_rows(z, y, torch.stack(rows, 1).flatten(2), eps, p)


def class_batched(model: nn.Module, x: Tensor, y: Tensor, eps: float, p: float) -> Tensor:
    xg, z = _forward(model, x)
    batch, classes = z.shape
    eye = torch.eye(classes, dtype=z.dtype, device=z.device)[:, None, :].expand(-1, batch, -1)
    (rows,) = torch.autograd.grad(z, xg, grad_outputs=eye, is_grads_batched=True, create_graph=True)
    return _from_rows(z, y, rows.transpose(0, 1).flatten(2), eps, p)


def func_jacrev(model: nn.Module, x: Tensor, y: Tensor, eps: float, p: float) -> Tensor:
    params = dict(model.named_parameters())

    def summed(xx: Tensor) -> Tensor:
        return functional_call(model, params, (xx,)).sum(0)

    rows = jacrev(summed)(x.detach())  # (C, B, *x)
    return _from_rows(model(x), y, rows.transpose(0, 1).flatten(2), eps, p)


def func_vmap(model: nn.Module, x: Tensor, y: Tensor, eps: float, p: float) -> Tensor:
    params = dict(model.named_parameters())

    def single(xi: Tensor) -> Tensor:
        return functional_call(model, params, (xi[None],))[0]

    rows = vmap(jacrev(single))(x.detach())  # (B, C, *x)
    return _from_rows(model(x), y, rows.flatten(2), eps, p)


def compiled(model: nn.Module, x: Tensor, y: Tensor, eps: float, p: float) -> Tensor:
    """diff_loop on ``torch.compile(model)`` (compiled once per model, cached on it)."""
    fast = getattr(model, "_hdl_compiled", None)
    if fast is None:
        fast = torch.compile(model)
        object.__setattr__(model, "_hdl_compiled", fast)  # not a submodule: no state change
    return diff_loop(fast, x, y, eps, p)


OPTIONS: dict[str, ExactFn] = {
    "diff_batched": diff_batched,
    "diff_loop": diff_loop,
    "class_loop": class_loop,
    "class_batched": class_batched,
    "func_jacrev": func_jacrev,
    "func_vmap": func_vmap,
    "compiled": compiled,
}
