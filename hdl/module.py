"""HolisticModule: one LightningModule for any network, trained with the composite loss.

The training step is written once here; MLP, CNN and RNN are only architectures. Validation
reports natural metrics; test also attacks the model (torchattacks PGD at every ``eval.eps``)
and keeps the test logits so that stability across split seeds can be measured later.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from hdl.errors import NonFiniteError
from hdl.eval_config import EvalConfig
from hdl.keys import metric_key, natural_key
from hdl.losses import HolisticLoss


class RunningMeans:
    """Batch-size-weighted means of detached scalar tensors over an epoch, kept on the device
    (no host sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def update(self, values: dict[str, Tensor], weight: int) -> None:
        for key, value in values.items():
            value = value.detach() * weight
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += weight

    def means(self) -> dict[str, Tensor]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


class HolisticModule(pl.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        loss: HolisticLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        eval_cfg: EvalConfig | None = None,
        input_range: tuple[float, float] | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.loss = loss
        self.task = loss.task
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.eval_cfg = eval_cfg if eval_cfg is not None else EvalConfig(square_check=False)
        self.eval_eps = list(self.eval_cfg.eps)
        self.input_range = tuple(input_range) if input_range is not None else None
        self.num_classes = num_classes
        # gradient-free Square at the largest radius: input-gradient penalties such as the
        # robust term can mask gradients, and then Square beats PGD (hdl-compare flags it)
        self.eval_square = (
            self.eval_cfg.square_check and self.task == "classification" and bool(self.eval_eps)
        )
        if loss.sparse.enabled:
            from hdl.sparsity import add_masks

            add_masks(self.net, init=float(loss.sparse.mask_init))
        # test metrics: natural, then one per attack radius (torchmetrics syncs them under DDP)
        self.test_natural = MeanMetric()
        self.test_adv = nn.ModuleList(MeanMetric() for _ in self.eval_eps)
        self.test_square = MeanMetric()
        self.test_logits: list[Tensor] = []
        self.test_targets: list[Tensor] = []
        self.test_results: dict[str, float] = {}
        self.epoch_terms = RunningMeans()
        self.val_terms = RunningMeans()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    # --- training --------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        out = self.loss.compute(self.net, x, y)
        bs = len(y)
        terms = dict(out.terms)
        if self.task == "classification":
            terms["acc"] = (out.logits.detach().argmax(1) == y).float().mean()
        self.epoch_terms.update(terms, bs)
        if batch_idx % max(self.trainer.log_every_n_steps, 1) == 0:  # a log call costs ~0.3 ms
            self.log("train/loss", out.total, prog_bar=True, on_step=True, batch_size=bs)
        return out.total

    def on_train_epoch_start(self) -> None:
        self.epoch_terms = RunningMeans()

    def on_train_epoch_end(self) -> None:
        # one log call per epoch: Lightning's per-call logging cost was most of its overhead
        means = {f"train/{k}": v for k, v in self.epoch_terms.means().items()}
        self.log_dict(means, sync_dist=True)
        self.check_finite(means, "training loss")

    def check_finite(self, values: dict[str, Tensor], what: str) -> None:
        """Stop the run when a value is NaN or infinite (:class:`NonFiniteError`, exit code 3):
        one host sync per epoch or validation (the values are already averaged on the device),
        never per step; agreed on by every rank under DDP."""
        if not values:
            return
        flags = torch.stack([v.detach().float().reshape(()) for v in values.values()]).isfinite()
        finite = bool(flags.all())
        if self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        bad = [k for k, ok in zip(values, flags.tolist(), strict=True) if not ok] or list(values)
        shown = ", ".join(f"{k}={float(values[k]):g}" for k in bad[:4])
        raise NonFiniteError(
            f"non-finite {what} at epoch {self.current_epoch}, step {self.global_step} "
            f"({shown}): the run is stopped; lower optimizer.lr or check the data"
        )

    def _natural(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.net(x)
        if self.task == "classification":
            return F.cross_entropy(out, y), (out.argmax(1) == y).float().mean(), out
        out = out.reshape(-1)
        return F.mse_loss(out, y.reshape(-1)), F.mse_loss(out, y.reshape(-1)), out

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        loss, metric, _ = self._natural(x, y)
        name = "val/acc" if self.task == "classification" else "val/mse"
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(y))
        self.log(name, metric, prog_bar=True, sync_dist=True, batch_size=len(y))
        self.val_terms.update({"val/loss": loss}, len(y))

    def on_validation_epoch_start(self) -> None:
        self.val_terms = RunningMeans()

    def on_validation_epoch_end(self) -> None:
        # before the checkpoint callbacks save this state (they run after the module's hook)
        if self.trainer.sanity_checking:
            return
        train = {f"train/{k}": v for k, v in self.epoch_terms.means().items()}
        self.check_finite(self.val_terms.means() | train, "loss")

    # --- test: natural and adversarial ----------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self.test_logits, self.test_targets = [], []

    def _outcome_metric(self, outcome: tuple[Tensor, Tensor | None]) -> Tensor:
        """Per-example correctness (classification) or squared error (regression)."""
        loss, correct = outcome
        return correct.float() if correct is not None else loss

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        from hdl.attacks import per_example_outcome, perturb, worst_case

        x, y = batch
        with torch.no_grad():
            out = self.net(x)
        clean = per_example_outcome(out, y, self.task)
        self.test_natural.update(self._outcome_metric(clean))
        self.test_logits.append(out.detach().cpu())
        self.test_targets.append(y.detach().cpu())
        ev = self.eval_cfg
        attacks = [
            (ev.attack, eps, meter) for eps, meter in zip(ev.eps, self.test_adv, strict=True)
        ]
        if self.eval_square:
            attacks.append(("square", max(ev.eps), self.test_square))
        for attack, eps, meter in attacks:
            x_adv = perturb(
                self.net,
                x,
                y,
                eps=eps,
                attack=attack,
                norm=ev.norm,
                steps=ev.steps,
                input_range=self.input_range,
                task=self.task,
                num_classes=self.num_classes,
                seed=batch_idx,
                queries=ev.square_queries,
            )
            with torch.no_grad():
                attacked = per_example_outcome(self.net(x_adv), y, self.task)
            # correct on the clean input AND under attack (never above natural accuracy)
            meter.update(self._outcome_metric(worst_case(clean, attacked)))

    def on_test_epoch_end(self) -> None:
        kind = "acc" if self.task == "classification" else "mse"
        results = {natural_key("test", kind): self.test_natural.compute()}
        for eps, meter in zip(self.eval_eps, self.test_adv, strict=True):
            results[metric_key("test", self.eval_cfg.attack, kind, eps)] = meter.compute()
        if self.eval_square:
            key = metric_key("test", "square", kind, max(self.eval_eps))
            results[key] = self.test_square.compute()
            self.test_square.reset()
        if self.task == "regression":
            results = {k.replace("mse", "rmse"): v.sqrt() for k, v in results.items()} | results
        # already reduced over ranks by torchmetrics: sync_dist only makes that explicit
        self.log_dict(results, sync_dist=True)
        self.test_results = {k: float(v) for k, v in results.items()}
        self.test_natural.reset()
        for meter in self.test_adv:
            meter.reset()

    # --- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self):
        return optimizer_groups(self)


def optimizer_groups(module: pl.LightningModule):
    """The optimizer (and scheduler) of a module with ``net``, ``loss``, ``optimizer_factory``
    and ``scheduler_factory``: the network's weights, the mask logits (no weight decay, their
    own ``loss.sparse.mask_lr``) and the loss's θ (no weight decay). Shared by one run's
    module and a stacked job's (hdl.stacked)."""
    net, loss = module.net, module.loss
    masks: list[nn.Parameter] = []
    if loss.sparse.enabled:
        from hdl.sparsity import mask_parameters

        masks = mask_parameters(net)
    mask_ids = {id(p) for p in masks}
    weights = [p for p in net.parameters() if id(p) not in mask_ids]
    groups: list[dict[str, Any]] = [{"params": weights}]
    if mask_ids:
        group: dict[str, Any] = {"params": masks, "weight_decay": 0.0}
        if loss.sparse.mask_lr is not None:  # its own rate: not scaled per stacked member
            group.update(lr=float(loss.sparse.mask_lr), own_lr=True)
        groups.append(group)
    loss_params = list(loss.parameters())
    if loss_params:  # theta of the stability term: no weight decay
        groups.append({"params": loss_params, "weight_decay": 0.0})
    optimizer = module.optimizer_factory(params=groups)
    if module.scheduler_factory is None:
        return optimizer
    scheduler = module.scheduler_factory(optimizer=optimizer)
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
    }
