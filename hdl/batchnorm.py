"""Batch norm in train mode, made per-example for the first-order robust term.

In train mode a batch-norm layer normalises with the mean and variance of the batch, so every
example's output depends on every other example, and the robust term's one batched input VJP
(:func:`hdl.losses._batched_input_vjp`, cotangent e_i - e_y per example) would mix the
examples' Jacobians. Under batch norm in train mode the term is therefore defined as exact for
**each example's own function with the batch statistics held fixed**: the mean and variance
are those of the batch (so they still depend on the weights and carry the weight gradient, and
the running statistics are updated once as usual), but an example's input gradient does not
flow through them.

:func:`per_example_forward` computes exactly that, at the cost of one extra forward and only
when some batch-norm layer uses batch statistics:

1. run the model on ``x.detach()`` as usual (this updates the running statistics once, as an
   ordinary train-mode forward would) and record, per layer, the batch mean and biased
   variance of its input: tensors with a graph to the weights but none to the input;
2. run it again on the grad-requiring ``x`` with every such layer normalising explicitly,
   ``(h - mean) / sqrt(var + eps) * weight + bias``, with the recorded statistics and no
   update of the running statistics or ``num_batches_tracked``.

The random state is rewound between the passes, so dropout draws the same masks in both (the
recorded statistics are those of the function pass 2 computes) and moves on once in all.
``SyncBatchNorm`` across several processes records the statistics of the global batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

Stats = tuple[Tensor, Tensor]  # (mean, biased variance) per channel


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether ``module`` is a batch-norm layer that normalises with the batch's statistics:
    train mode (tracking running statistics or not), or eval mode without running statistics."""
    return isinstance(module, _BatchNorm) and (
        module.training or (module.running_mean is None and module.running_var is None)
    )


def batch_statistics_layers(model: nn.Module) -> list[_BatchNorm]:
    """The batch-norm layers of ``model`` that couple the examples of a batch."""
    return [m for m in model.modules() if uses_batch_statistics(m)]


def per_example_forward(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)``, with every batch-norm layer that uses batch statistics holding them fixed.

    Without such a layer this is plainly ``model(x)`` (bit for bit, no extra cost). Otherwise the
    output has the same value as an ordinary forward, the running statistics move exactly as
    after one, the weight gradient flows through the batch statistics as in one, but the input
    gradient of example b is that of example b's own function: the batched input VJP of the
    robust term is exact per example.
    """
    layers = batch_statistics_layers(model)
    if not layers:
        return model(x)
    rng = _rng_state(x.device)
    stats = _record_statistics(model, x, layers)
    _set_rng_state(x.device, rng)  # pass 2 draws the same dropout masks as pass 1
    with fixed_statistics(stats):
        return model(x)


def _record_statistics(
    model: nn.Module, x: Tensor, layers: Sequence[_BatchNorm]
) -> dict[_BatchNorm, list[Stats]]:
    """Pass 1: an ordinary forward on ``x.detach()``; the batch statistics of every call of
    every layer, in call order (a layer may be called more than once per forward)."""
    stats: dict[_BatchNorm, list[Stats]] = {m: [] for m in layers}

    def record(module: _BatchNorm, args: tuple) -> None:
        stats[module].append(_batch_statistics(module, args[0]))

    handles = [m.register_forward_pre_hook(record) for m in layers]
    try:
        model(x.detach())
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _batch_statistics(module: _BatchNorm, h: Tensor) -> Stats:
    """Mean and biased variance of ``h`` per channel (dim 1), in at least float32."""
    if h.dim() < 2:
        raise ValueError(f"batch norm needs an input of at least 2 dimensions, got {h.dim()}")
    h = h.to(torch.promote_types(h.dtype, torch.float32))
    dims = [0, *range(2, h.dim())]
    var, mean = torch.var_mean(h, dim=dims, correction=0)
    group = _sync_group(module)
    if group is not None:
        count = torch.full((1,), h.numel() // h.shape[1], dtype=h.dtype, device=h.device)
        mean, var = _global_statistics(mean, var, count, group)
    return mean, var


def _sync_group(module: _BatchNorm):
    """The process group whose global batch a ``SyncBatchNorm`` normalises with, or None."""
    if not (
        isinstance(module, nn.SyncBatchNorm)
        and module.training
        and dist.is_available()
        and dist.is_initialized()
    ):
        return None
    group = module.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes, with a gradient (the sum of the processes' gradients)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllReduceSum.apply(grad.contiguous(), ctx.group), None


def _global_statistics(mean: Tensor, var: Tensor, count: Tensor, group) -> Stats:
    """The global batch's statistics from every process's (mean, var, count), differentiably."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    packed = torch.cat([mean, var, count]).unsqueeze(0)  # this process's row of (world, 2C + 1)
    zeros = packed.new_zeros(world, packed.shape[1])
    rows = torch.cat([zeros[:rank], packed, zeros[rank + 1 :]])
    gathered = _AllReduceSum.apply(rows, group)  # every process's row: an all-gather
    channels = mean.shape[0]
    return combine_statistics(
        gathered[:, :channels], gathered[:, channels : 2 * channels], gathered[:, -1:]
    )


def combine_statistics(means: Tensor, variances: Tensor, counts: Tensor) -> Stats:
    """Mean and biased variance of the union of parts from their own (K, C), (K, C), (K, 1)."""
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total
    var = (counts * (variances + (means - mean).pow(2))).sum(0) / total
    return mean, var


def _normalise(module: _BatchNorm, h: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """``(h - mean) / sqrt(var + eps) * weight + bias`` per channel (dim 1), with gradients to
    the recorded statistics, in their (at least float32) precision, returned in h's dtype."""
    shape = (1, -1) + (1,) * (h.dim() - 2)
    out = (h.to(mean.dtype) - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + module.eps)
    if module.weight is not None:
        out = out * module.weight.reshape(shape)
    if module.bias is not None:
        out = out + module.bias.reshape(shape)
    return out.to(h.dtype)


@contextmanager
def fixed_statistics(stats: dict[_BatchNorm, list[Stats]]) -> Iterator[None]:
    """Pass 2: each layer normalises with its recorded statistics (its n-th call with the n-th
    recorded pair) and updates nothing; the layers are restored afterwards, even on error."""
    missing = object()
    saved: dict[_BatchNorm, object] = {}
    used = dict.fromkeys(stats, 0)

    def fixed_forward(module: _BatchNorm):
        def forward(h: Tensor) -> Tensor:
            module._check_input_dim(h)
            recorded = stats[module]
            if used[module] >= len(recorded):
                raise RuntimeError(
                    f"{type(module).__name__} was called more often in the second pass than in "
                    "the first: the model's forward must not depend on anything but its input"
                )
            mean, var = recorded[used[module]]
            used[module] += 1
            return _normalise(module, h, mean, var)

        return forward

    try:
        for module in stats:
            saved[module] = module.__dict__.get("forward", missing)
            module.__dict__["forward"] = fixed_forward(module)
        yield
        if any(used[m] != len(stats[m]) for m in stats):
            raise RuntimeError(
                "a batch-norm layer was called less often in the second pass than in the first: "
                "the model's forward must not depend on anything but its input"
            )
    finally:
        for module, old in saved.items():
            if old is missing:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = old


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
