"""Which jobs of a sweep can train together as one stacked job (docs/stacked.md). Light: no
torch, so the launcher groups a sweep's jobs before anything heavy is imported.

Two jobs stack when their resolved configs agree on everything but the **member keys** (the
values a member may hold on its own: seeds, split, the loss's weights) and the labels (where
the run is written, how it is named, logged and printed). Whether a loss term is on is part of
the structure: ``loss.robust.eps`` 0 and 0.1 do not stack, 0.1 and 0.2 do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

# values one member may hold on its own, the others keeping theirs (hdl.stacked reads them from
# each member's built loss; the data and the init come from each member's own build)
MEMBER_KEYS = frozenset(
    {
        "seed",
        "data.seed",
        "data.split_seed",
        "loss.robust.eps",
        "loss.stable.ratio",
        "loss.stable.theta_init",
        "loss.sparse.l0",
        "loss.l2",
    }
)
# optimizer.lr is a member's value too where the update is the learning rate times a direction
# that does not depend on it (Adam, SGD: hdl.stacked scales each member's update) and no
# scheduler changes the rate during training; otherwise it is structure
LR_SCALABLE_OPTIMIZERS = frozenset({"torch.optim.Adam", "torch.optim.SGD"})
# labels: where and how a run is written, named, logged, printed and resumed
LABEL_KEYS = frozenset(
    {
        "run_id",
        "name",
        "tags",
        "print_metrics",
        "print_config",
        "verbose",
        "on_failure",
        "resume",
        "loss.name",
        "trainer.default_root_dir",
        "callbacks.last_checkpoint.dirpath",
    }
)
LABEL_PREFIXES = ("hydra.", "logger.")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _switches(flat: Mapping[str, Any]) -> dict[str, bool]:
    """Which loss terms are on: structure, never a member's value."""
    return {
        "robust": float(flat.get("loss.robust.eps") or 0) > 0,
        "stable": flat.get("loss.stable.ratio") is not None,
        "sparse": float(flat.get("loss.sparse.l0") or 0) > 0,
        "l2": float(flat.get("loss.l2") or 0) > 0,
    }


def relative_cost(cfg: DictConfig | Mapping[str, Any]) -> float:
    """A rough relative cost of one job (``cfg``: its task config; a plain one = 1), to start
    the costly tasks first. From the stacked 25-run comparison on 2 CPU cores: the sparsity
    masks add about 60 %, the robust term 30 %, the stability term 10 % (docs/stacked.md)."""
    node = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    on = _switches(_flatten(node))
    return 1.0 + 0.3 * on["robust"] + 0.6 * on["sparse"] + 0.1 * on["stable"]


def lr_is_member_value(flat: Mapping[str, Any]) -> bool:
    """Whether members may differ in ``optimizer.lr`` (see LR_SCALABLE_OPTIMIZERS)."""
    scheduler = any(k.startswith("scheduler.") and v is not None for k, v in flat.items())
    return flat.get("optimizer._target_") in LR_SCALABLE_OPTIMIZERS and not scheduler


def not_stackable(flat: Mapping[str, Any]) -> str | None:
    """Why this job must run on its own (None: it can be a member of a stacked job)."""
    target = str(flat.get("model._target_", ""))
    checks = [
        (not flat.get("train", True), "train=false (an evaluation)"),
        (bool(flat.get("ckpt_path")), "ckpt_path is set"),
        ("rnn" in target.lower(), "a recurrent model"),
        (bool(flat.get("model.batch_norm")), "batch norm"),
        (float(flat.get("model.dropout") or 0) > 0, "dropout"),
        (
            _switches(flat)["robust"] and flat.get("loss.robust.method") != "first_order",
            f"loss.robust.method={flat.get('loss.robust.method')}",
        ),
        (flat.get("trainer.gradient_clip_val") is not None, "a gradient-norm clip"),
        (str(flat.get("trainer.devices", 1)) not in ("1", "auto"), "several devices"),
        (int(flat.get("trainer.num_nodes") or 1) > 1, "several nodes"),
        ("ddp" in str(flat.get("trainer.strategy") or ""), "a DDP strategy"),
        (bool(flat.get("trainer.gpu_per_job")), "trainer.gpu_per_job"),
        (any(k.startswith("callbacks.early_stopping.") for k in flat), "early stopping"),
    ]
    for failed, reason in checks:
        if failed:
            return reason
    return None


def stacking_key(cfg: DictConfig | Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(key, None) for a job that can stack, jobs of equal keys stacking together; (None,
    reason) for one that runs on its own. ``cfg`` is the job's task config (no ``hydra``)."""
    node = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat = _flatten(node)
    reason = not_stackable(flat)
    if reason is not None:
        return None, reason
    shared = {
        k: v
        for k, v in flat.items()
        if k not in MEMBER_KEYS and k not in LABEL_KEYS and not k.startswith(LABEL_PREFIXES)
    }
    if lr_is_member_value(flat):
        shared.pop("optimizer.lr", None)
    shared["switches"] = _switches(flat)
    return json.dumps(shared, sort_keys=True, default=str), None
