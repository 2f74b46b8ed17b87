"""Validation of a composed config, before anything is built or trained.

Each check raises :class:`ConfigError` with one line that names the offending key. Values
inside the data, model and loss blocks are also checked by their constructors (they raise the
same error), so every mistake surfaces before the first training step.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from hdl.budget import Budget, SelectConfig
from hdl.errors import ConfigError
from hdl.eval_config import EvalConfig

REQUIRED_GROUPS = ("data", "model", "loss", "optimizer", "trainer", "eval")


def _missing_value(cfg: DictConfig) -> str | None:
    """The first ``???`` value left in the config, as a dotted key."""

    def walk(node, prefix: str) -> str | None:
        if not isinstance(node, DictConfig) or node._is_none():
            return None
        for key in node.keys():
            path = f"{prefix}{key}"
            if path == "hydra":
                continue
            if OmegaConf.is_missing(node, key):
                return path
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                found = walk(child, path + ".")
                if found:
                    return found
        return None

    return walk(cfg, "")


def plain(node):
    """A config node as plain containers (resolved); anything else as it is."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def validate(cfg: DictConfig) -> None:
    missing = _missing_value(cfg)
    if missing:
        raise ConfigError(f"{missing} must be set (e.g. hdl-train {missing}=...)")
    for group in REQUIRED_GROUPS:
        if not cfg.get(group):
            raise ConfigError(f"{group} is missing: choose one, e.g. hdl-train {group}=<preset>")
    try:
        for key in cfg:
            if key != "hydra":
                OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(
                    cfg[key]
                ) else cfg[key]
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key} must be set") from None

    EvalConfig.from_mapping(OmegaConf.to_container(cfg.eval, resolve=True))

    budget = Budget.from_mapping(plain(cfg.get("budget")))
    SelectConfig.from_mapping(plain(cfg.get("select")))
    epochs = cfg.trainer.get("max_epochs")
    if budget.steps is None and (not isinstance(epochs, int) or epochs < 1):
        raise ConfigError(
            f"trainer.max_epochs must be a positive integer (or set budget.steps), got {epochs!r}"
        )
    threads = cfg.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer or null, got {threads!r}")
    ckpt = cfg.get("ckpt_path")
    if ckpt and not Path(ckpt).is_file():
        raise ConfigError(f"ckpt_path: checkpoint not found: {ckpt}")
