"""Stacked training: N members of one architecture trained as one network (docs/stacked.md).

Every parameter of the members is stacked along a new leading member dimension and the forward
is ``torch.func.vmap`` of ``torch.func.functional_call`` over that dimension, so it works for
any module (MLP, CNN, masked or not); under vmap a Linear layer becomes one batched matrix
product for all members. A batch of the stacked job is the members' own batches concatenated
(N * B examples, member-major): each example only meets its own member's weights, so per-example
quantities (the loss, the input gradients of the robust term) are those of the member alone.
The loss is reduced per member and the members' totals are summed: the gradient of the sum with
respect to a member's parameters is that member's own gradient, and the optimizer (element-wise,
as Adam and SGD are) moves each member exactly as it would move alone.

What would couple the members is refused (:func:`check_stackable`): batch norm (its batch
statistics would need a per-member path), dropout (the random masks would be drawn differently),
recurrent layers (no batching rule for the fused kernels), adversarial and certified training.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from hdl.callbacks import Selection, selection_eligible
from hdl.errors import ConfigError, NonFiniteError
from hdl.module import RunningMeans, optimizer_groups


def check_stackable(members: Sequence[nn.Module]) -> None:
    """ConfigError naming what keeps these networks from training as one stacked network."""
    if not members:
        raise ConfigError("stacked: no members")
    first = members[0]
    for module in first.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            raise ConfigError(
                "stacked: batch norm is not stacked (its batch statistics would mix the "
                "members' batches); run these jobs separately"
            )
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            raise ConfigError(
                "stacked: dropout is not stacked (the members would draw other masks than "
                "alone); run these jobs separately"
            )
        if isinstance(module, nn.RNNBase):
            raise ConfigError(
                "stacked: recurrent layers are not stacked; run these jobs separately"
            )
    shapes = {n: tuple(p.shape) for n, p in first.named_parameters()}
    buffers = dict(first.named_buffers())
    for i, other in enumerate(members[1:], start=1):
        theirs = {n: tuple(p.shape) for n, p in other.named_parameters()}
        if theirs != shapes:
            raise ConfigError(f"stacked: member {i} has other parameters than member 0")
        for name, b in other.named_buffers():
            if name not in buffers or not torch.equal(b, buffers[name]):
                raise ConfigError(f"stacked: member {i} has another buffer {name} than member 0")


class StackedNet(nn.Module):
    """N networks of one architecture as one module; ``forward`` takes the members' batches
    concatenated, (N * B, ...), and returns (N * B, ...) outputs.

    ``base`` is a copy of member 0 whose parameters are replaced by the stacked (N, ...) ones,
    under the same names: the sparsity schedule's functions (temperature, clipping, hard masks,
    rewinding) act on all members at once, element-wise, and :meth:`member_state` is member
    ``i``'s state dict. Buffers are shared (they must be equal, :func:`check_stackable`).
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        check_stackable(members)
        base = copy.deepcopy(members[0])
        for name, param in list(base.named_parameters()):
            owner_name, _, leaf = name.rpartition(".")
            owner = base.get_submodule(owner_name) if owner_name else base
            stacked = torch.stack([m.get_parameter(name).detach() for m in members]).clone()
            owner._parameters[leaf] = nn.Parameter(stacked, requires_grad=param.requires_grad)
        self.base = base
        self.size = len(members)

    def _params(self) -> dict[str, Tensor]:
        return dict(self.base.named_parameters())

    def _member_forward(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.base, params, (x,))

    def forward(self, x: Tensor) -> Tensor:
        n = self.size
        if x.shape[0] % n:
            raise ValueError(f"stacked batch of {x.shape[0]} rows is not {n} members' batches")
        xs = x.reshape(n, x.shape[0] // n, *x.shape[1:])
        out = vmap(self._member_forward)(self._params(), xs)
        return out.reshape(x.shape[0], *out.shape[2:])

    def penalties(self) -> tuple[Tensor, Tensor]:
        """Per-member (l0, l2) penalties, each (N,): the mean mask entry and the squared norm
        of the effective weights. ``base`` holds the stacked tensors and masks act element-wise,
        so the penalty functions run on it directly, reducing per member."""
        from hdl.losses import weight_norm_sq
        from hdl.sparsity import l0_penalty

        return l0_penalty(self.base, self.size), weight_norm_sq(self.base, self.size)

    @torch.no_grad()
    def member_state(self, i: int) -> dict[str, Tensor]:
        """Member ``i``'s state dict (the keys of one member network's ``state_dict``)."""
        state = {k: v.detach()[i].clone() for k, v in self._params().items()}
        for name, buffer in self.base.named_buffers():
            state[name] = buffer.detach().clone()
        return state


class ZipBatches:
    """The members' loaders as one: each batch is the members' batches concatenated (member
    major), so member ``i`` sees exactly the batches it would see alone."""

    def __init__(self, loaders: Sequence[Any]) -> None:
        lengths = {len(loader) for loader in loaders}
        if len(lengths) != 1:
            raise ConfigError(
                f"stacked: the members' loaders differ in length ({sorted(lengths)} batches): "
                "their data sets must have the same size"
            )
        self.loaders = list(loaders)

    def set_epoch(self, epoch: int) -> None:
        for loader in self.loaders:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batches in zip(*self.loaders, strict=True):
            sizes = {len(y) for _, y in batches}
            if len(sizes) != 1:
                raise ConfigError(f"stacked: the members' batches differ in size ({sizes})")
            yield torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


class StackedData(pl.LightningDataModule):
    """The members' data modules as one: zipped train and validation loaders (each member its
    own split, shuffling and batches)."""

    def __init__(self, members: Sequence[pl.LightningDataModule]) -> None:
        super().__init__()
        self.members = list(members)

    def setup(self, stage: str | None = None) -> None:
        for data in self.members:
            data.prepare_arrays()

    def train_dataloader(self) -> ZipBatches:
        loaders = []
        for data in self.members:
            data.trainer = self.trainer  # the epoch to shuffle for (resume)
            loaders.append(data.train_dataloader())
        return ZipBatches(loaders)

    def val_dataloader(self) -> ZipBatches:
        return ZipBatches([data.val_dataloader() for data in self.members])


def _learning_rate(factory: Any) -> float | None:
    """The ``lr`` a (partial) optimizer factory was configured with, None if not visible."""
    keywords = getattr(factory, "keywords", None) or {}
    return float(keywords["lr"]) if "lr" in keywords else None


def _member_values(members: Sequence[Any], get) -> Tensor:
    return torch.tensor([float(get(m)) for m in members])


class StackedModule(pl.LightningModule):
    """N :class:`hdl.module.HolisticModule` members trained as one step.

    The members share the loss's structure (which terms are on, the norm, the sparsity schedule)
    and may differ in its values: ``loss.robust.eps``, ``loss.stable.ratio`` and ``theta_init``,
    ``loss.sparse.l0``, ``loss.l2`` (each an (N,) buffer here), besides their data split, init
    seed and data. θ of the stability term is an (N,) parameter. ``members`` keep their own
    modules, into which :meth:`member_state_dict` unstacks the trained weights.
    """

    def __init__(self, members: Sequence[Any]) -> None:
        super().__init__()
        first = members[0]
        loss = first.loss
        if loss.robust.enabled and loss.robust.method != "first_order":
            raise ConfigError(
                f"stacked: loss.robust.method={loss.robust.method} (adversarial or certified "
                "training) is not stacked; run these jobs separately"
            )
        self.size = len(members)
        self.net = StackedNet([m.net for m in members])
        self.loss = copy.deepcopy(loss)  # the structure; the values per member below
        if loss.stable.enabled:
            thetas = torch.stack([m.loss.theta.detach() for m in members]).clone()
            self.loss.theta = nn.Parameter(thetas)
        self.register_buffer("eps", _member_values(members, lambda m: m.loss.robust.eps))
        self.register_buffer("ratio", _member_values(members, lambda m: m.loss.stable.ratio or 1.0))
        self.register_buffer("l0", _member_values(members, lambda m: m.loss.sparse.l0))
        self.register_buffer("l2", _member_values(members, lambda m: m.loss.l2))
        self.task = loss.task
        rates = [_learning_rate(m.optimizer_factory) for m in members]
        self.register_buffer("lr_scale", None)  # None: every member at member 0's rate
        if len(set(rates)) > 1:  # a member's update is scaled to its own rate (optimizer_step)
            optimizer = getattr(first.optimizer_factory, "func", None)
            if None in rates or optimizer not in (torch.optim.Adam, torch.optim.SGD):
                raise ConfigError(
                    "stacked: members differ in optimizer.lr, which only Adam and SGD allow"
                )
            if first.scheduler_factory is not None:
                raise ConfigError(
                    "stacked: members differ in optimizer.lr under a learning-rate scheduler"
                )
            self.register_buffer("lr_scale", torch.tensor([r / rates[0] for r in rates]))
        self.optimizer_factory = first.optimizer_factory
        self.scheduler_factory = first.scheduler_factory
        self.__dict__["members"] = list(members)  # not submodules: their weights are unstacked
        self.epoch_terms = RunningMeans()
        self.val_sums = RunningMeans()
        self.val_results: dict[str, Tensor] = {}
        self.history: list[dict[str, Any]] = []  # per-member logs, replayed into their loggers

    # --- the loss, per member --------------------------------------------------------------
    def member_losses(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """(members' totals (N,), their terms, each (N,), natural outputs (N * B, ...)): the
        composite loss of :class:`hdl.losses.HolisticLoss`, reduced per member."""
        loss, n = self.loss, self.size
        classification = self.task == "classification"
        if loss.robust.enabled or loss.stable.enabled:
            eps = self.eps.repeat_interleave(len(y) // n) if loss.robust.enabled else None
            per, outputs = loss.per_example(self.net, x, y, eps=eps)
        else:
            outputs = self.net(x)
            per = (
                F.cross_entropy(outputs, y, reduction="none")
                if classification
                else (outputs.reshape(-1) - y.reshape(-1)).pow(2)
            )
        per = per.view(n, -1)
        natural = (
            F.cross_entropy(outputs.detach(), y, reduction="none")
            if classification
            else (outputs.detach().reshape(-1) - y.reshape(-1)).pow(2)
        )
        terms = {"ce" if classification else "mse": natural.view(n, -1).mean(1)}
        if loss.robust.enabled:
            terms["robust"] = per.detach().mean(1)
        if loss.stable.enabled:
            from hdl.losses import stable_loss

            data_loss = stable_loss(per, loss.theta, self.ratio)
            terms["stable"] = data_loss.detach()
            terms["theta"] = loss.theta.detach()
        else:
            data_loss = per.mean(1)
        total = data_loss
        if loss.sparse.enabled or loss.l2:
            l0, l2 = self.net.penalties()
            if loss.sparse.enabled:
                total = total + self.l0 * l0
                terms["l0"] = l0.detach()
            if loss.l2:
                total = total + self.l2 * l2
                terms["l2"] = l2.detach()
        terms["total"] = total.detach()
        return total, terms, outputs

    # --- training --------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        totals, terms, outputs = self.member_losses(x, y)
        if self.task == "classification":
            correct = (outputs.detach().argmax(1) == y).float()
            terms["acc"] = correct.view(self.size, -1).mean(1)
        self.epoch_terms.update(terms, len(y) // self.size)
        # no per-step self.log: the members' terms go to their own loggers (history), and a
        # Lightning log call costs more than a small member's step
        return totals.sum()  # each member's gradient is its own total's

    def on_train_epoch_start(self) -> None:
        self.epoch_terms = RunningMeans()

    def on_train_epoch_end(self) -> None:
        means = {f"train/{k}": v for k, v in self.epoch_terms.means().items()}
        self._check_finite(means, "training loss")
        self.history.append({"step": self.global_step, "epoch": self.current_epoch, **means})

    def _check_finite(self, values: dict[str, Tensor], what: str) -> None:
        if not values:
            return
        bad = [k for k, v in values.items() if not bool(v.isfinite().all())]
        if bad:
            shown = ", ".join(f"{k}={values[k].tolist()}" for k in bad[:2])
            raise NonFiniteError(
                f"non-finite {what} at epoch {self.current_epoch}, step {self.global_step} "
                f"({shown}): the stacked job is stopped; lower optimizer.lr or check the data"
            )

    # --- validation: each member's natural loss and accuracy ---------------------------------
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        outputs = self.net(x)
        per_member = len(y) // self.size
        if self.task == "classification":
            loss = F.cross_entropy(outputs, y, reduction="none").view(self.size, -1)
            metric = (outputs.argmax(1) == y).float().view(self.size, -1)
            values = {"val/loss": loss.mean(1), "val/acc": metric.mean(1)}
        else:
            err = (outputs.reshape(-1) - y.reshape(-1)).pow(2).view(self.size, -1)
            values = {"val/loss": err.mean(1), "val/mse": err.mean(1)}
        self.val_sums.update(values, per_member)

    def on_validation_epoch_start(self) -> None:
        self.val_sums = RunningMeans()

    def on_validation_epoch_end(self) -> None:
        self.val_results = self.val_sums.means()
        for key, value in self.val_results.items():  # the members' mean, for the progress bar
            self.log(key, value.mean(), prog_bar=True)
        if self.trainer.sanity_checking:
            return
        self._check_finite(self.val_results, "validation loss")
        self.history.append(
            {"step": self.global_step, "epoch": self.current_epoch, **self.val_results}
        )

    # --- members ---------------------------------------------------------------------------
    @torch.no_grad()
    def member_state_dict(self, i: int) -> dict[str, Tensor]:
        """Member ``i``'s ``HolisticModule.state_dict()`` with the stacked job's weights."""
        member = self.members[i]
        state = {k: v.detach().cpu().clone() for k, v in member.state_dict().items()}
        for name, value in self.net.member_state(i).items():
            state[f"net.{name}"] = value.cpu()
        if self.loss.stable.enabled:
            state["loss.theta"] = self.loss.theta.detach()[i].cpu().clone()
        return state

    def configure_optimizers(self):
        return optimizer_groups(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["member_history"] = self.history  # the members' logs survive a resume

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get("member_history", []))

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Members with their own learning rates: the optimizer steps at member 0's rate and
        each member's update is scaled by its rate's ratio to it. Exact for optimizers whose
        update is the rate times a direction independent of it (Adam, SGD; hdl.stacking), up to
        the rounding of recovering the update from the parameters."""
        if self.lr_scale is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        scaled = [
            p
            for group in optimizer.param_groups
            if not group.get("own_lr")
            for p in group["params"]
        ]
        before = [p.detach().clone() for p in scaled]
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        with torch.no_grad():
            for p, old in zip(scaled, before, strict=True):
                scale = self.lr_scale.view(-1, *([1] * (p.dim() - 1)))
                p.copy_(old + scale * (p - old))


def _member_slice(value: Any, i: int, size: int) -> Any:
    """Member ``i``'s part of a stacked tensor (leading dimension ``size``); anything else as is."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size:
        return value[i].clone()
    return value


def member_checkpoint(
    full: dict[str, Any], stacked: StackedModule, selector: StackedSelectBest, i: int, dirpath: str
) -> dict[str, Any]:
    """Member ``i``'s Lightning checkpoint cut from the stacked job's ``full`` one: its weights,
    its slice of the optimizer state (and its own learning rate), its selection as a
    :class:`hdl.callbacks.SelectBest` state, its slice of the sparsity rewind snapshot, and the
    loops' progress (the same as alone). A run of the member's configuration resumes from it as
    from its own ``last.ckpt`` (docs/stacked.md)."""
    size = stacked.size
    out = {
        k: v for k, v in full.items() if k not in ("state_dict", "optimizer_states", "callbacks")
    }
    out.pop("member_history", None)
    out["state_dict"] = stacked.member_state_dict(i)
    rates = stacked.lr_scale
    optimizers = []
    for state in full.get("optimizer_states", []):
        groups = []
        for group in state["param_groups"]:
            group = dict(group)
            if rates is not None and not group.get("own_lr"):
                group["lr"] = float(group["lr"]) * float(rates[i])
            groups.append(group)
        per_param = {
            pid: {k: _member_slice(v, i, size) for k, v in values.items()}
            for pid, values in state["state"].items()
        }
        optimizers.append({"state": per_param, "param_groups": groups})
    out["optimizer_states"] = optimizers
    callbacks: dict[str, Any] = {}
    for key, state in full.get("callbacks", {}).items():
        if key == StackedSelectBest.__qualname__:
            from hdl.callbacks import SelectBest

            callbacks[SelectBest.__qualname__] = selector.selections[i].state_dict()
        elif key.startswith("SparsityCallback"):
            snapshot = state.get("snapshot")
            if snapshot is not None:
                snapshot = {k: _member_slice(v, i, size) for k, v in snapshot.items()}
            callbacks[key] = {**state, "snapshot": snapshot}
        elif key.startswith("ModelCheckpoint"):
            callbacks[key] = {**state, "dirpath": dirpath}
        else:
            callbacks[key] = state
    out["callbacks"] = callbacks
    return out


class StackedSelectBest(pl.Callback):
    """Model selection on validation for every member (:class:`hdl.callbacks.Selection`, the
    same rule as one run's :class:`hdl.callbacks.SelectBest`). A member whose ``patience`` ran
    out keeps its choice and ignores later checks (it would have stopped alone); the job stops
    when every member has."""

    def __init__(self, members: int, monitor: str, mode: str, patience: int | None) -> None:
        super().__init__()
        self.selections = [Selection(monitor, mode, patience) for _ in range(members)]
        self.monitor = monitor

    def on_validation_end(self, trainer: pl.Trainer, pl_module: StackedModule) -> None:
        if trainer.sanity_checking or not selection_eligible(trainer):
            return
        values = pl_module.val_results.get(self.monitor)
        if values is None:
            raise ConfigError(f"select.monitor={self.monitor} is not a logged validation metric")
        for i, (selection, value) in enumerate(zip(self.selections, values.tolist(), strict=True)):
            if selection.stopped:
                continue
            selection.update(
                float(value),
                trainer.global_step,
                trainer.current_epoch,
                lambda i=i: pl_module.member_state_dict(i),
            )
        if all(s.stopped for s in self.selections):
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"selections": [s.state_dict() for s in self.selections]}

    def load_state_dict(self, state_dict: dict) -> None:
        for selection, state in zip(self.selections, state_dict["selections"], strict=True):
            selection.load_state_dict(state)
