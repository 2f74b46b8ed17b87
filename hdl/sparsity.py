"""Continuous sparsification: a differentiable L0 surrogate on every weight tensor.

Each weight ``w`` of a Linear, Conv or RNN layer is reparametrized (``torch.nn.utils.parametrize``)
as ``w * m`` with ``m = sigmoid(beta * s) / sigmoid(s0)`` (so ``m == 1`` at the start, where
``s == s0`` and ``beta == 1``; ``s0 = 0`` gives the plain ``sigmoid(0)`` of docs/loss.md) while searching, and
``m = 1[s > 0]`` once the mask is hard. ``beta`` (the temperature) grows
geometrically from 1 to ``final_temp`` over a search round; between rounds the logits are clipped
to ``min(final_temp * s, init)`` so that the mask found survives ``beta`` restarting at 1
(Savarese et al., "Winning the lottery with continuous sparsification"). :class:`SparsityCallback`
drives the rounds, the lottery-ticket rewinding and the final, frozen hard round.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.utils import parametrize

from hdl.errors import ConfigError

__all__ = [
    "ContinuousMask",
    "Schedule",
    "SparseConfig",
    "SparsityCallback",
    "add_masks",
    "clip_logits",
    "effective_state",
    "effective_weights",
    "l0_penalty",
    "mask_parameters",
    "masks",
    "parameter_counts",
    "plan_schedule",
    "set_hard",
    "set_temperature",
    "strip_masks",
    "temperature_at",
    "zero_fractions",
]

_CONV_TYPES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_RNN_WEIGHT_PREFIXES = ("weight_ih_l", "weight_hh_l", "weight_hr_l")


class ContinuousMask(nn.Module):
    """A ``torch.nn.utils.parametrize`` parametrization: ``forward(w) -> w * self.mask()``."""

    def __init__(self, weight: Tensor | Sequence[int], init: float = 0.0) -> None:
        super().__init__()
        if isinstance(weight, Tensor):
            logits = torch.full_like(weight.detach(), float(init))
        else:
            logits = torch.full(tuple(weight), float(init))
        self.logits = nn.Parameter(logits)
        # 1 / sigmoid(s0), as in Savarese et al.'s code: the soft mask starts at exactly 1 for
        # any init (2, i.e. 1 / sigmoid(0), for s0 = 0; docs/loss.md)
        self.scale = 1.0 + math.exp(-float(init))
        self.register_buffer("temperature", torch.tensor(1.0, device=logits.device))
        self.register_buffer("hard", torch.tensor(False, device=logits.device))

    def mask(self) -> Tensor:
        """``1[s > 0]`` when hard, else ``sigmoid(temperature * s) / sigmoid(s0)``.

        ``torch.where`` on the 0-dim ``hard`` buffer instead of ``if self.hard``: no host/device
        sync per forward, and the flag still lives in the state dict.
        """
        soft = torch.sigmoid(self.temperature * self.logits) * self.scale
        binary = (self.logits > 0).to(self.logits.dtype)
        return torch.where(self.hard, binary, soft)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask()

    def extra_repr(self) -> str:
        return f"shape={tuple(self.logits.shape)}"


# --- which tensors are weights ---------------------------------------------------------------


def _weight_names(module: nn.Module) -> list[str]:
    """Names of the weight tensors of a Linear / Conv / RNN module (no biases), else []."""
    if isinstance(module, (nn.Linear, *_CONV_TYPES)):
        return ["weight"]
    if isinstance(module, nn.RNNBase):
        return [n for n in module._flat_weights_names if n.startswith(_RNN_WEIGHT_PREFIXES)]
    return []


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _weight_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(module name, module, tensor name) for every weight tensor, in registration order."""
    for mod_name, module in model.named_modules():
        for name in _weight_names(module):
            yield mod_name, module, name


def _module_masks(module: nn.Module) -> Iterator[tuple[str, ContinuousMask]]:
    if not parametrize.is_parametrized(module):
        return
    for tensor_name, plist in module.parametrizations.items():
        for p in plist:
            if isinstance(p, ContinuousMask):
                yield tensor_name, p


# --- RNN modules: keep _flat_weights in sync with the parametrized weights -------------------


def _refresh_flat_weights(module: nn.RNNBase, args: Any) -> None:
    """Forward pre-hook: RNN forwards read ``module._flat_weights`` (the tensors captured at
    construction), not ``getattr(module, name)``; point it at the masked values. Recent torch
    also refreshes them itself (``_update_flat_weights``); this keeps older versions correct."""
    module._flat_weights = [
        getattr(module, n) if hasattr(module, n) else None for n in module._flat_weights_names
    ]


def _release_flat_weights(module: nn.RNNBase, args: Any, output: Any) -> None:
    """Forward hook: drop the graph-carrying masked tensors after the forward. Otherwise
    ``copy.deepcopy(model)`` fails ("Only Tensors created explicitly by the user ...") and the
    graph of the last forward is kept alive until the next one."""
    module._flat_weights = [
        w.detach() if isinstance(w, Tensor) and w.grad_fn is not None else w
        for w in module._flat_weights
    ]


def _has_hook(hooks: dict, fn: Any) -> bool:
    return any(h is fn for h in hooks.values())


def _install_rnn_hooks(module: nn.RNNBase) -> None:
    if not _has_hook(module._forward_pre_hooks, _refresh_flat_weights):
        module.register_forward_pre_hook(_refresh_flat_weights)
    if not _has_hook(module._forward_hooks, _release_flat_weights):
        module.register_forward_hook(_release_flat_weights, always_call=True)


def _remove_rnn_hooks(module: nn.RNNBase) -> None:
    for hooks, fn in (
        (module._forward_pre_hooks, _refresh_flat_weights),
        (module._forward_hooks, _release_flat_weights),
    ):
        for key in [k for k, h in hooks.items() if h is fn]:
            del hooks[key]
            for extra in ("_forward_hooks_always_called", "_forward_hooks_with_kwargs"):
                getattr(module, extra, {}).pop(key, None)


def _reset_flat_weights(module: nn.RNNBase) -> None:
    if hasattr(module, "_init_flat_weights"):
        module._init_flat_weights()
    else:  # pragma: no cover - very old torch
        _refresh_flat_weights(module, ())


# --- public functions ------------------------------------------------------------------------


def add_masks(model: nn.Module, init: float = 0.0) -> int:
    """Mask every weight tensor of ``model``'s Linear, Conv(Transpose) and RNN/LSTM/GRU layers.

    Biases, norm layers and embeddings are left alone. Tensors that already carry a
    :class:`ContinuousMask` are skipped, so calling it twice is harmless. Returns how many
    tensors were masked by this call.
    """
    added = 0
    for mod_name, module, name in list(_weight_modules(model)):
        if any(t == name for t, _ in _module_masks(module)):
            continue
        weight = getattr(module, name)
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"cannot mask {_qualified(mod_name, name)}: lazy module not initialised yet "
                "(run one forward pass first)"
            )
        parametrize.register_parametrization(module, name, ContinuousMask(weight, init))
        added += 1
        if isinstance(module, nn.RNNBase):
            _install_rnn_hooks(module)
    return added


def masks(model: nn.Module) -> list[tuple[str, ContinuousMask]]:
    """(qualified weight name such as ``"body.0.weight"``, mask) for every masked tensor."""
    found = []
    for mod_name, module in model.named_modules():
        for tensor_name, mask in _module_masks(module):
            found.append((_qualified(mod_name, tensor_name), mask))
    return found


def mask_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All mask logits (they get their own optimizer parameter group)."""
    return [m.logits for _, m in masks(model)]


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def member_sum(t: Tensor, members: int | None) -> Tensor:
    """``t.sum()``, or with ``members`` the (members,) sums over all but the leading member
    dimension (the stacked networks of hdl.stacked)."""
    return t.sum() if members is None else t.reshape(members, -1).sum(1)


def l0_penalty(model: nn.Module, members: int | None = None) -> Tensor:
    """Mean of all mask entries (the L0 surrogate: the fraction of weights kept, softly); a
    0-dim tensor, 0 when nothing is masked. A mean, not a sum, so that one ``loss.sparse.l0``
    means the same pressure for a 6,000-weight MLP and a 1M-weight CNN (docs/loss.md).
    ``members``: the tensors are stacked along a leading member dimension; (members,) means."""
    found = masks(model)
    if not found:
        shape = () if members is None else (members,)
        return torch.zeros(shape, device=_device(model))
    total = torch.stack([member_sum(m.mask(), members) for _, m in found]).sum(0)
    numel = sum(m.logits.numel() for _, m in found)
    return total / (numel if members is None else numel // members)


@torch.no_grad()
def set_temperature(model: nn.Module, beta: float) -> None:
    for _, m in masks(model):
        m.temperature.fill_(float(beta))


@torch.no_grad()
def set_hard(model: nn.Module, hard: bool = True) -> None:
    """Switch every mask to ``1[s > 0]`` and freeze its logits (``hard=False`` undoes both)."""
    for _, m in masks(model):
        m.hard.fill_(bool(hard))
        m.logits.requires_grad_(not hard)


@torch.no_grad()
def clip_logits(model: nn.Module, final_temp: float, init: float) -> None:
    """Between search rounds: ``s <- min(final_temp * s, init)``.

    Multiplying by the final temperature makes ``sigmoid(1 * s')`` at the next round's start
    equal ``sigmoid(final_temp * s)`` at the end of this one, so pruned weights stay pruned
    when the temperature restarts at 1; the cap lets kept weights compete again.
    """
    for _, m in masks(model):
        m.logits.mul_(float(final_temp)).clamp_(max=float(init))


def temperature_at(progress: float, final_temp: float) -> float:
    """Geometric schedule: ``final_temp ** progress``, progress clamped to [0, 1]."""
    if final_temp <= 0:
        raise ValueError(f"final_temp must be > 0, got {final_temp!r}")
    return float(final_temp) ** min(max(float(progress), 0.0), 1.0)


@torch.no_grad()
def zero_fractions(model: nn.Module) -> dict[str, float]:
    """Fraction of exactly-zero entries of every effective (masked) weight tensor of the
    Linear / Conv / RNN layers, masked or not, plus ``"total"`` weighted by size."""
    out: dict[str, float] = {}
    zeros = 0
    total = 0
    for mod_name, module, name in _weight_modules(model):
        w = getattr(module, name)
        n_zero = int((w == 0).sum())
        out[_qualified(mod_name, name)] = n_zero / max(w.numel(), 1)
        zeros += n_zero
        total += w.numel()
    out["total"] = zeros / total if total else 0.0
    return out


@torch.no_grad()
def effective_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict the model would have without masks: parametrized tensors evaluated
    (masked values baked in) under their plain names, mask logits and buffers left out.
    It loads into an unmasked copy of the same architecture."""
    out: dict[str, Tensor] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        parametrized = parametrize.is_parametrized(module)
        for name, p in module._parameters.items():
            if p is not None:
                out[prefix + name] = p.detach().clone()
        if parametrized:
            for name in module.parametrizations:
                out[prefix + name] = getattr(module, name).detach().clone()
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                out[prefix + name] = b.detach().clone()
        for name, child in module._modules.items():
            if child is None or (parametrized and name == "parametrizations"):
                continue
            walk(child, f"{prefix}{name}.")

    walk(model, "")
    return out


def effective_weights(model: nn.Module) -> dict[str, Tensor]:
    """The parameters as the forward pass uses them (masks applied), under their plain names,
    without buffers or mask logits: what is counted and compared as "the weights"."""
    buffers = {name for name, _ in model.named_buffers()}
    return {name: t for name, t in effective_state(model).items() if name not in buffers}


@torch.no_grad()
def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) of the network as the forward pass uses them: every
    effective tensor once, mask logits and the raw pre-mask weights not counted."""
    params = list(effective_weights(model).values())
    return sum(t.numel() for t in params), sum(int((t != 0).sum()) for t in params)


@torch.no_grad()
def strip_masks(model: nn.Module) -> nn.Module:
    """Remove the mask parametrizations in place, baking the masked values into the weights
    (for export). A tensor that carries other parametrizations besides the mask has them baked
    in as well (parametrize cannot remove one entry of a chain). Returns ``model``."""
    for _, module in list(model.named_modules()):
        names = [t for t, _ in _module_masks(module)]
        for name in names:
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        if names and isinstance(module, nn.RNNBase):
            _remove_rnn_hooks(module)
            _reset_flat_weights(module)
    return model


# --- the configuration and the schedule -----------------------------------------------------


@dataclass
class SparseConfig:
    """``loss.sparse``: the switch, the values and their checks, in one place (docs/loss.md).

    The schedule is defined on optimizer **steps**, so it means the same on 300 rows and on
    60,000 images: the run's T steps are split into ``search_rounds`` soft rounds and a final
    hard round of equal length (the final one takes the remainder); the weights are snapshot
    ``rewind_fraction`` of the way into round 0 and rewound at every later round.
    """

    l0: float = 0.0  # weight of the MEAN mask entry (the L0 surrogate); 0: no masks at all
    final_temp: float = 200.0
    search_rounds: int = 1
    rewind_fraction: float = 0.05  # snapshot point in round 0, as a fraction of a round's steps
    mask_init: float = 0.1  # > 0: noise around the threshold 1[s > 0] must not prune
    mask_lr: float | None = None  # learning rate of the mask logits (None: the optimizer's)

    @property
    def enabled(self) -> bool:
        return float(self.l0) > 0

    @property
    def rounds(self) -> int:
        return int(self.search_rounds) + 1

    def check(self) -> None:
        """One-line ConfigErrors naming the key, for every impossible value."""
        if not math.isfinite(float(self.l0)) or float(self.l0) < 0:
            raise ConfigError(f"loss.sparse.l0 must be >= 0, got {self.l0!r}")
        if not float(self.final_temp) >= 1.0:
            raise ConfigError(f"loss.sparse.final_temp must be >= 1, got {self.final_temp!r}")
        if isinstance(self.search_rounds, bool) or int(self.search_rounds) < 0:
            raise ConfigError(f"loss.sparse.search_rounds must be >= 0, got {self.search_rounds!r}")
        if not 0.0 <= float(self.rewind_fraction) < 1.0:
            raise ConfigError(
                f"loss.sparse.rewind_fraction must be in [0, 1), got {self.rewind_fraction!r}"
            )
        if int(self.search_rounds) == 0 and float(self.mask_init) <= 0:
            raise ConfigError(
                "loss.sparse.mask_init must be > 0 when loss.sparse.search_rounds is 0 "
                f"(the hard mask 1[s > 0] of s = {self.mask_init!r} prunes every weight)"
            )
        if self.mask_lr is not None and not float(self.mask_lr) > 0:
            raise ConfigError(f"loss.sparse.mask_lr must be > 0 or null, got {self.mask_lr!r}")

    def callback(self, min_round_steps: int = 0) -> SparsityCallback:
        """The schedule that runs this configuration (checked first)."""
        self.check()
        return SparsityCallback(self, min_round_steps=min_round_steps)


@dataclass
class Schedule:
    """The step schedule of one run: round r covers steps [r * round_steps, (r + 1) *
    round_steps), the final round runs to ``total``; the snapshot is taken before step
    ``rewind_step``."""

    total: int
    search_rounds: int
    round_steps: int
    rewind_step: int

    @property
    def final_round(self) -> int:
        return self.search_rounds

    def round_of(self, step: int) -> int:
        if self.search_rounds == 0:
            return 0
        return min(step // self.round_steps, self.final_round)

    def progress(self, step: int) -> float:
        """Position in a search round, 0 at its first step and 1 at its last."""
        r = self.round_of(step)
        return (step - r * self.round_steps) / max(self.round_steps - 1, 1)


def plan_schedule(
    total_steps: int, config: SparseConfig, min_round_steps: int = 0
) -> tuple[Schedule, list[str]]:
    """The schedule for a budget of ``total_steps`` optimizer steps, and warnings.

    A budget too small for the configured rounds (a smoke run: ``fast_dev_run``, one epoch) is
    not refused: the search rounds are dropped until each round has at least 2 steps (a
    temperature ramp needs two), down to the final hard round alone, with a warning."""
    warnings: list[str] = []
    total = int(total_steps)
    search = int(config.search_rounds)
    while search > 0 and total // (search + 1) < 2:
        search -= 1
    if search < int(config.search_rounds):
        warnings.append(
            f"loss.sparse: {total} optimizer steps cannot hold {config.search_rounds} search "
            f"round(s) and a final round; the schedule is shrunk to {search} search round(s) "
            "(a smoke run? its sparsity numbers mean nothing)"
        )
    round_steps = total // (search + 1) if search else total
    if search and min_round_steps and round_steps < min_round_steps:
        warnings.append(
            f"loss.sparse: {round_steps} steps per sparsity round, fewer than "
            f"budget.min_round_steps={min_round_steps}: give the run more steps "
            "(budget.steps) for a sparsity search that converges"
        )
    rewind = int(float(config.rewind_fraction) * round_steps) if search else 0
    return Schedule(total, search, max(round_steps, 1), rewind), warnings


class SparsityCallback(pl.Callback):
    """Runs continuous sparsification over the run's optimizer steps (:class:`Schedule`).

    In a search round the temperature grows geometrically from 1 to ``final_temp``, reaching it
    at the round's last step. The non-mask parameters of ``pl_module.net`` and of
    ``pl_module.loss`` (θ of the stability term) are snapshot before step ``rewind_step`` of
    round 0 and rewound, with their optimizer state cleared, at the start of every later round.
    Before a later *search* round the logits are clipped (:func:`clip_logits`); the final round
    makes the mask hard and frozen. No clip before the final round: with ``mask_init <= 0`` the
    clip maps every kept logit to ``<= 0``, and the hard mask ``1[s > 0]`` would prune everything.
    The total is Lightning's ``estimated_stepping_batches``, so ``trainer.max_steps`` and
    ``trainer.max_epochs`` budgets both work.
    """

    def __init__(self, config: SparseConfig | None = None, min_round_steps: int = 0) -> None:
        super().__init__()
        self.config = config if config is not None else SparseConfig(l0=1.0)
        self.config.check()
        self.min_round_steps = int(min_round_steps)
        self.final_temp = float(self.config.final_temp)
        self.mask_init = float(self.config.mask_init)
        self.schedule: Schedule | None = None
        self.current_round = 0
        self.snapshot: dict[str, Tensor] | None = None

    # --- helpers -------------------------------------------------------------------------
    @property
    def final_round(self) -> int:
        assert self.schedule is not None, "the schedule is planned when training starts"
        return self.schedule.final_round

    def in_final_round(self) -> bool:
        """Whether training is in the final, hard-mask round (model selection happens there)."""
        return self.schedule is not None and self.current_round == self.schedule.final_round

    @staticmethod
    def _net(pl_module: pl.LightningModule) -> nn.Module:
        net = getattr(pl_module, "net", None)
        if not isinstance(net, nn.Module):
            raise TypeError("SparsityCallback needs the network at pl_module.net")
        return net

    @classmethod
    def _weights(cls, pl_module: pl.LightningModule) -> list[tuple[str, nn.Parameter]]:
        """What is snapshot and rewound: the network's non-mask parameters and the loss's own
        parameters (θ of the stability term, as ``loss.theta``). θ is the dual variable of the
        CVaR over the per-example losses of *these* weights: rewinding the weights but keeping a
        θ fitted to the end of the previous round would start the round off its optimum."""
        net = cls._net(pl_module)
        mask_ids = {id(p) for p in mask_parameters(net)}
        found = [(n, p) for n, p in net.named_parameters() if id(p) not in mask_ids]
        loss = getattr(pl_module, "loss", None)
        if isinstance(loss, nn.Module):
            found += [(f"loss.{n}", p) for n, p in loss.named_parameters()]
        return found

    # --- Lightning hooks -----------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        net = self._net(pl_module)
        if not masks(net):  # normally the module has added them already
            add_masks(net, self.mask_init)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule is None:  # a resumed run keeps the schedule it was planned with
            total = trainer.estimated_stepping_batches
            if not isinstance(total, int) or total < 1:
                raise ConfigError(
                    "loss.sparse needs a finite training budget (budget.steps, or "
                    f"trainer.max_epochs with a sized loader), got {total!r} steps"
                )
            self.schedule, warnings = plan_schedule(total, self.config, self.min_round_steps)
            for warning in warnings:
                rank_zero_warn(warning)
        # requires_grad is not part of any checkpoint: re-freeze after a resume in the final round
        if self.current_round == self.final_round:
            set_hard(self._net(pl_module), True)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        schedule = self.schedule
        assert schedule is not None
        net = self._net(pl_module)
        step = trainer.global_step
        r = schedule.round_of(step)
        if r > self.current_round:
            self._enter_round(trainer, pl_module, r)
        if schedule.search_rounds and r == 0 and step >= schedule.rewind_step:
            if self.snapshot is None:
                self.snapshot = {n: p.detach().clone() for n, p in self._weights(pl_module)}
        beta = 1.0  # the final round's hard mask ignores the temperature
        if r < schedule.final_round:
            beta = temperature_at(schedule.progress(step), self.final_temp)
            set_temperature(net, beta)
        if batch_idx % max(trainer.log_every_n_steps, 1) == 0:
            pl_module.log("sparsity/temperature", beta, on_step=True, on_epoch=False)
            pl_module.log("sparsity/round", float(r), on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = zero_fractions(self._net(pl_module))["total"]
        pl_module.log("sparsity/zero_fraction", total, on_step=False, on_epoch=True)

    def _enter_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule, r: int) -> None:
        net = self._net(pl_module)
        if r < self.final_round:
            clip_logits(net, self.final_temp, self.mask_init)
        weights = self._weights(pl_module)
        if self.snapshot is None:
            rank_zero_warn(
                "SparsityCallback: no rewind snapshot (resumed from a checkpoint without the "
                "callback state?); round starts without rewinding"
            )
        else:
            with torch.no_grad():
                for name, p in weights:
                    if name in self.snapshot:
                        p.copy_(self.snapshot[name])
        # the rewound weights and the clipped/frozen logits start with fresh optimizer state
        params = [p for _, p in weights] + mask_parameters(net)
        for optimizer in trainer.optimizers:
            for p in params:
                optimizer.state.pop(p, None)
        set_temperature(net, 1.0)
        if r == self.final_round:
            set_hard(net, True)
        self.current_round = r

    # --- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        schedule = None if self.schedule is None else asdict(self.schedule)
        return {
            "current_round": self.current_round,
            "snapshot": self.snapshot,
            "schedule": schedule,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.current_round = int(state_dict.get("current_round", 0))
        snap = state_dict.get("snapshot")
        self.snapshot = None if snap is None else dict(snap)
        schedule = state_dict.get("schedule")
        self.schedule = None if schedule is None else Schedule(**schedule)
