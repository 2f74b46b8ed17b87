"""What a run prints (docs/runs.md, "Quiet by default"): its progress bar, the warnings that
matter, and the metrics table. W&B's chatter, Lightning's info lines (GPU/TPU availability, the
LitLogger tip) and third-party deprecation noise are off unless ``verbose: true``; the config
tree is printed with ``print_config: true``. Light: no torch."""

from __future__ import annotations

import logging
import os
import warnings

# deprecation and advice noise of the libraries hdl-train uses, not of the run itself
NOISE = (
    r".*isinstance\(treespec, LeafSpec\).*",  # Lightning's _pytree on recent torch
    r".*does not have many workers.*",  # the data are tensors in memory, batched by index
    r".*Experiment logs directory .* exists and is not empty.*",  # a resume (history is kept)
    r".*Checkpoint directory .* exists and is not empty.*",  # a resume
    r".*The number of training batches .* is smaller than the logging interval.*",
)
INFO_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)


def quiet(verbose: bool = False) -> None:
    """Silence the noise (or, with ``verbose``, let everything through)."""
    if verbose:
        for name in INFO_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
        return
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(pytorch_lightning|torch)")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in INFO_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def print_config_tree(cfg, fields: tuple[str, ...] | None = None) -> None:
    """The composed config as a rich tree, one branch per group (``print_config: true``)."""
    from omegaconf import DictConfig, OmegaConf
    from rich import print as rprint
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", style="dim", guide_style="dim")
    keys = fields or tuple(k for k in cfg.keys() if k != "hydra")
    for key in keys:
        node = cfg.get(key)
        branch = tree.add(str(key), style="bold")
        if isinstance(node, DictConfig):
            try:
                text = OmegaConf.to_yaml(node, resolve=True)
            except Exception:  # noqa: BLE001 - an interpolation only a Hydra job resolves
                text = OmegaConf.to_yaml(node, resolve=False)
        else:
            text = str(node)
        branch.add(Syntax(text.rstrip() or "null", "yaml", theme="ansi_dark"))
    rprint(tree)
