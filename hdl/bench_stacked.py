"""hdl-bench's ``stacked`` section: one optimizer step of N members as one stacked network
(:class:`hdl.stacked.StackedModule`) against N separate steps of the same members, at each N,
for the loss variants of ``stacked.variants`` (docs/stacked.md)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig

from hdl.models.mlp import MLP


def _member(cfg: DictConfig, loss: Any, seed: int):
    from hdl.module import HolisticModule

    torch.manual_seed(seed)
    net = MLP(
        input_shape=[int(cfg.features)], num_outputs=int(cfg.classes), hidden=list(cfg.hidden)
    )
    return HolisticModule(net, loss, optimizer=partial(torch.optim.Adam, lr=1e-3))


def _stacked_step(members: list, x: torch.Tensor, y: torch.Tensor):
    from hdl.stacked import StackedModule

    stacked = StackedModule(members)
    optimizer = torch.optim.Adam(stacked.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        totals, _, _ = stacked.member_losses(x, y)
        totals.sum().backward()
        optimizer.step()

    return step


def bench_stacked(
    cfg: DictConfig,
    variants: DictConfig,
    clock: Callable[[], float],
    build_loss: Callable[[Any], Any],
    make_step: Callable[..., Callable[[], None]],
) -> list[dict[str, Any]]:
    """ms per optimizer step of all N members: separate (N steps, one per member, as
    ``make_step`` runs one run's step) and stacked (one step), and the speed-up, for each
    variant and N. ``build_loss`` makes a variant's loss from its spec (hdl-bench's)."""
    rows = []
    batch, features, classes = int(cfg.batch_size), int(cfg.features), int(cfg.classes)
    for name in cfg.variants:
        spec = variants[name]
        for n in cfg.members:
            n = int(n)
            x = torch.randn(n, batch, features)
            y = torch.randint(0, classes, (n, batch))
            separate = []
            for i in range(n):
                member = _member(cfg, build_loss(spec), i)
                separate.append(make_step(member.net, member.loss, x[i], y[i]))
            members = [
                _member(cfg, build_loss(spec), i) for i in range(n)
            ]  # masks added as in a run
            stacked = _stacked_step(members, x.reshape(n * batch, features), y.reshape(-1))
            for step in [*separate, stacked]:  # warm-up
                step()
            times_sep, times_stk = [], []
            for _ in range(int(cfg.repeats)):
                start = clock()
                for step in separate:
                    step()
                times_sep.append(clock() - start)
                start = clock()
                stacked()
                times_stk.append(clock() - start)
            sep = 1000 * statistics.median(times_sep)
            stk = 1000 * statistics.median(times_stk)
            rows.append(
                {
                    "variant": name,
                    "members": n,
                    "separate_ms": sep,
                    "stacked_ms": stk,
                    "speedup": sep / stk,
                }
            )
    return rows
