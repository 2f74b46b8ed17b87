"""A run's identity is its configuration (docs/runs.md, "Run identity").

``identity.json`` in the run directory holds a hash of the resolved config without the
bookkeeping keys below, and that config (flattened) so that a mismatch can name its keys.
Relaunching a ``run_id`` (or a sweep job) resumes only when the identity matches; otherwise a
one-line :class:`ConfigError` (exit 2) names the keys that differ and suggests a new run_id.
Light: no torch, no Lightning.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from hdl.errors import ConfigError

FILE = "identity.json"
# keys that do not change what a run computes: where it runs, how it is launched, logged,
# printed, resumed or labelled. trainer.max_epochs is the length of training: relaunching
# with more epochs continues the same run.
IGNORED_KEYS = frozenset(
    {
        "ckpt_path",
        "resume",
        "run_id",
        "name",
        "print_metrics",
        "print_config",
        "verbose",
        "threads",
        "tags",
        "on_failure",
        "test",
        "trainer.devices",
        "trainer.accelerator",
        "trainer.num_nodes",
        "trainer.strategy",
        "trainer.gpu_per_job",
        "trainer.default_root_dir",
        "trainer.max_epochs",
        "trainer.enable_progress_bar",
        "trainer.enable_model_summary",
        "trainer.log_every_n_steps",
    }
)
IGNORED_PREFIXES = ("hydra.", "logger.", "callbacks.")
KEPT_PREFIXES = ("callbacks.early_stopping.",)  # a callback that changes when training stops


def _ignored(key: str) -> bool:
    if key.startswith(KEPT_PREFIXES) or f"{key}.".startswith(KEPT_PREFIXES):
        return False
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES) or key == "hydra"


def _plain(node: Any) -> Any:
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def identity_config(cfg: DictConfig | Mapping) -> dict[str, Any]:
    """The resolved config as ``{dotted key: value}`` without the bookkeeping keys (lists are
    values). Keys are resolved one by one: an ignored key is never resolved (a ``${hydra:...}``
    outside a Hydra job, a timestamp)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        keys = node.keys() if isinstance(node, DictConfig | Mapping) else []
        for key in keys:
            path = f"{prefix}{key}"
            if _ignored(path):
                continue
            try:
                child = node[key] if not isinstance(node, DictConfig) else node._get_node(key)
                if isinstance(node, DictConfig) and OmegaConf.is_missing(node, key):
                    out[path] = "???"
                    continue
                if isinstance(child, DictConfig) and not child._is_none():
                    walk(child, path + ".")
                    continue
                if isinstance(child, Mapping):
                    walk(child, path + ".")
                    continue
                value = node[key]
                out[path] = _plain(value)
            except Exception as err:  # noqa: BLE001 - an unresolvable value is still a value
                out[path] = f"<unresolved: {type(err).__name__}>"

    walk(cfg, "")
    return out


def identity_hash(config: Mapping[str, Any]) -> str:
    text = json.dumps(dict(sorted(config.items())), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_identity(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and "config" in saved else None


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value differs (missing on one side included)."""
    marker = "<absent>"
    keys = sorted(set(old) | set(new))
    diffs = []
    for key in keys:
        a, b = old.get(key, marker), new.get(key, marker)
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            diffs.append(f"{key}: {_short(a)} -> {_short(b)}")
    return diffs


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_identity(run_dir: Path, cfg: DictConfig | Mapping, what: str | None = None) -> None:
    """Raise a one-line ConfigError when ``run_dir`` holds a run of another configuration."""
    saved = read_identity(run_dir)
    if saved is None:
        return
    current = identity_config(cfg)
    if saved.get("hash") == identity_hash(current):
        return
    diffs = differences(saved["config"], current)
    if not diffs:
        return
    shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
    run_id = cfg.get("run_id") if isinstance(cfg, DictConfig | Mapping) else None
    where = what or (f"run_id={run_id}" if run_id else str(run_dir))
    raise ConfigError(
        f"{where} already holds a run of another configuration ({run_dir}; differs: {shown}): "
        "use a new run_id (or remove that folder) instead of resuming it"
    )


def write_identity(run_dir: Path, cfg: DictConfig | Mapping) -> str:
    """Write ``identity.json`` (atomically); return the hash."""
    config = identity_config(cfg)
    digest = identity_hash(config)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{FILE}.{os.getpid()}"
    tmp.write_text(json.dumps({"hash": digest, "config": config}, indent=1, default=str))
    os.replace(tmp, run_dir / FILE)
    return digest
