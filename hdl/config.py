"""Validation of a composed config, before anything is built or trained.

Each check raises :class:`ConfigError` with one line that names the offending key. Two levels:

- :func:`check_light` imports neither torch nor Lightning, so ``hdl-train`` (and every job of a
  sweep, before the first one starts) refuses a wrong key or value in about a second: missing
  values, unknown top-level keys, value types against the schema presets, ranges of the run's
  own keys;
- :func:`validate` adds the checks that need the attack registry (``eval``).

Values inside the data, model and loss blocks are also checked by their constructors (they raise
the same error), so every mistake surfaces before the first training step.
"""

from __future__ import annotations

import difflib
import math
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from hdl.budget import Budget, SelectConfig
from hdl.errors import ConfigError, DataError
from hdl.eval_config import EvalConfig

REQUIRED_GROUPS = ("data", "model", "loss", "optimizer", "trainer", "eval")
# top-level keys that presets add (conf/hparams_search/objective.yaml), beyond conf/train.yaml's
OPTIONAL_KEYS = ("objective", "optimized_metric")
ON_FAILURE = ("continue", "stop")
# schema presets whose value types every preset of the group keeps (bool / integer / number)
SCHEMAS = {"loss": ("loss", "baseline"), "data": ("data", "_splits")}
# numeric keys whose schema value is null (its type is not in the file)
NULLABLE_NUMBERS = {
    "loss.robust.top_k": int,
    "loss.robust.step_size": float,
    "loss.stable.ratio": float,
    "data.limit": int,
}


def config_dir() -> str:
    """The ``conf/`` folder: shipped inside the package when installed, else the repo's."""
    packaged = Path(__file__).resolve().parent / "conf"
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf")


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


@lru_cache(maxsize=1)
def known_top_level_keys() -> frozenset[str]:
    """conf/train.yaml's own keys, its config groups, and the optional keys of presets."""
    train = OmegaConf.load(Path(config_dir()) / "train.yaml")
    keys = {k for k in train.keys() if k not in ("defaults", "hydra")}
    for entry in train.get("defaults", []):
        if isinstance(entry, str) or not OmegaConf.is_config(entry):
            continue
        for group in entry.keys():
            name = str(group).split("@")[0].removeprefix("override ").strip("/")
            if "/" not in name and name not in ("_self_", "experiment", "debug"):
                keys.add(name)
    return frozenset(keys | set(OPTIONAL_KEYS) | set(REQUIRED_GROUPS) | {"hydra"})


def _leaf_keys(cfg: DictConfig) -> list[str]:
    out: list[str] = []

    def walk(node, prefix: str) -> None:
        for key in node.keys():
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_none():
                walk(child, f"{prefix}{key}.")
            else:
                out.append(f"{prefix}{key}")

    walk(cfg, "")
    return out


def check_top_level_keys(cfg: DictConfig) -> None:
    """``+lr=0.1`` adds a key nothing reads: refuse it, naming the key (and what was meant)."""
    known = known_top_level_keys()
    for key in cfg.keys():
        if key in known:
            continue
        nested = [k for k in _leaf_keys(cfg) if k.split(".")[-1] == key and "." in k]
        close = difflib.get_close_matches(str(key), sorted(known), n=1)
        hint = nested[0] if nested else close[0] if close else None
        raise ConfigError(
            f"{key} is not a known key: nothing reads it"
            + (
                f" (did you mean {hint}?)"
                if hint
                else f"; top-level keys: {', '.join(sorted(known - {'hydra'}))}"
            )
        )


@cache
def _schema(group: str, name: str) -> dict[str, Any]:
    path = Path(config_dir()) / group / f"{name}.yaml"
    if not path.is_file():
        return {}
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    node.pop("defaults", None)
    return node


def _type_error(key: str, value: Any, expected: type) -> ConfigError:
    what = {bool: "true or false", int: "an integer", float: "a number"}[expected]
    return ConfigError(f"{key} must be {what}, got {value!r}")


def _check_type(key: str, value: Any, expected: type) -> None:
    if value is None and expected is not bool:
        return
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok:
        raise _type_error(key, value, expected)


def check_types(cfg: DictConfig) -> None:
    """Values of the loss and data blocks have the types of their schema presets
    (``conf/loss/baseline.yaml``, ``conf/data/_splits.yaml``): ``loss.robust.eps=abc`` is refused
    here, naming the key, rather than deep inside the loss."""

    def walk(schema: dict[str, Any], node: Any, prefix: str) -> None:
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            path = f"{prefix}{key}"
            default = schema.get(key)
            if isinstance(default, dict):
                walk(default, value, path + ".")
            elif path in NULLABLE_NUMBERS and default is None:
                _check_type(path, value, NULLABLE_NUMBERS[path])
            elif isinstance(default, bool):
                _check_type(path, value, bool)
            elif isinstance(default, int):
                _check_type(path, value, int)
            elif isinstance(default, float):
                _check_type(path, value, float)

    for group, (folder, name) in SCHEMAS.items():
        node = plain(cfg.get(group))
        walk(_schema(folder, name), node, f"{group}.")
        for key, kind in NULLABLE_NUMBERS.items():  # keys the schema file does not have
            if key.startswith(f"{group}.") and key.count(".") == 1:
                value = (node or {}).get(key.split(".")[1]) if isinstance(node, dict) else None
                _check_type(key, value, kind)


def check_optimizer(cfg: DictConfig) -> None:
    """``optimizer.lr`` is a positive number, weight decay and momentum non-negative numbers (the
    optimizer itself is only built when training starts)."""
    node = plain(cfg.get("optimizer")) or {}
    for key, positive in (("lr", True), ("weight_decay", False), ("momentum", False)):
        if key not in node:
            continue
        value = node[key]
        _check_type(f"optimizer.{key}", value, float)
        if value is None or not math.isfinite(value) or value < 0 or (positive and value == 0):
            bound = "> 0" if positive else ">= 0"
            raise ConfigError(f"optimizer.{key} must be a finite number {bound}, got {value!r}")


def check_run_keys(cfg: DictConfig) -> None:
    """The run's own keys (conf/train.yaml)."""
    threads = cfg.get("threads")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ConfigError(f"threads must be a positive integer or null, got {threads!r}")
    for key in ("train", "test", "resume", "print_metrics", "print_config", "verbose"):
        if key in cfg and cfg.get(key) is not None:
            _check_type(key, cfg.get(key), bool)
    on_failure = cfg.get("on_failure", "continue")
    if on_failure not in ON_FAILURE:
        raise ConfigError(f"on_failure must be one of {', '.join(ON_FAILURE)}, got {on_failure!r}")
    tags = plain(cfg.get("tags"))
    if tags is not None and (
        not isinstance(tags, list) or not all(isinstance(t, str | int | float) for t in tags)
    ):
        raise ConfigError(f"tags must be a list of words, e.g. tags=[baseline,v2], got {tags!r}")
    data = plain(cfg.get("data"))
    for key in ("path", "features_path", "labels_path"):  # a sweep finds these before it starts
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, str) and value and not Path(value).expanduser().exists():
            raise DataError(f"data.{key}: file not found: {value}")
    ckpt = cfg.get("ckpt_path")
    if ckpt and not Path(str(ckpt)).is_file():
        raise ConfigError(f"ckpt_path: checkpoint not found: {ckpt}")
    if not cfg.get("train", True):
        if not ckpt:
            raise ConfigError(
                "train=false evaluates a checkpoint without training: set "
                "ckpt_path=<run dir>/selected.ckpt (or <run dir>/checkpoints/last.ckpt)"
            )
        if not cfg.get("test", True):
            raise ConfigError("train=false and test=false: nothing to do")


def check_light(cfg: DictConfig) -> None:
    """Every check that needs neither torch nor Lightning (fast: before the heavy imports)."""
    missing = _missing_value(cfg)
    if missing:
        raise ConfigError(f"{missing} must be set (e.g. hdl-train {missing}=...)")
    for group in REQUIRED_GROUPS:
        if not cfg.get(group):
            raise ConfigError(f"{group} is missing: choose one, e.g. hdl-train {group}=<preset>")
    check_top_level_keys(cfg)
    try:
        for key in cfg:
            if key != "hydra":
                plain(cfg[key])
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key} must be set") from None
    except OmegaConfBaseException as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{getattr(err, 'full_key', None) or 'config'}: {first}") from None
    check_run_keys(cfg)
    check_types(cfg)
    check_optimizer(cfg)
    budget = Budget.from_mapping(plain(cfg.get("budget")))
    SelectConfig.from_mapping(plain(cfg.get("select")))
    epochs = cfg.trainer.get("max_epochs")
    if budget.steps is None and (
        isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1
    ):
        raise ConfigError(
            f"trainer.max_epochs must be a positive integer (or set budget.steps), got {epochs!r}"
        )


# keys a group's target receives from hdl itself, not from the config
INJECTED = {
    "model": {"input_shape", "num_outputs"},
    "optimizer": {"params"},
    "scheduler": {"optimizer"},
    "trainer": {"callbacks", "logger", "plugins", "gpu_per_job"},
}
TARGET_GROUPS = ("data", "model", "trainer", "optimizer", "scheduler")


def accepted_arguments(target: Any) -> set[str] | None:
    """The keyword arguments ``target`` (a class or function) accepts, following ``**kwargs``
    up the class hierarchy; None when it takes any."""
    import inspect

    functions = (
        [c.__init__ for c in inspect.getmro(target)] if inspect.isclass(target) else [target]
    )
    names: set[str] = set()
    for fn in functions:
        if fn is object.__init__:
            break
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names - {"self"}
    return None  # **kwargs all the way up (or to object): anything goes


def check_targets(cfg: DictConfig) -> None:
    """Every key of the data, model, trainer, optimizer and scheduler blocks is an argument of
    its ``_target_`` (``+model.foo=1`` names ``model.foo``), checked on the signatures, before
    any data is loaded. Imports the targets (torch, Lightning)."""
    from hydra.utils import get_method

    for group in TARGET_GROUPS:
        node = plain(cfg.get(group))
        if not isinstance(node, dict) or "_target_" not in node:
            continue
        try:
            target = get_method(str(node["_target_"]))
        except Exception as err:  # noqa: BLE001 - a wrong _target_
            raise ConfigError(
                f"{group}._target_: cannot import {node['_target_']} ({err})"
            ) from None
        accepted = accepted_arguments(target)
        if accepted is None:
            continue
        given = {k for k in node if not k.startswith("_") and k != "name"}
        unknown = sorted(given - accepted - INJECTED.get(group, set()))
        if unknown:
            raise ConfigError(
                f"{group}.{unknown[0]} is not an argument of {node['_target_']} (remove it, or "
                f"check its spelling)"
            )


def check_loss(cfg: DictConfig) -> None:
    """The loss block's keys and values (:class:`hdl.losses.HolisticLoss` checks them)."""
    from hdl.errors import HDLError
    from hdl.losses import HolisticLoss

    node = plain(cfg.get("loss")) or {}
    try:
        HolisticLoss(task="classification", **node)
    except HDLError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"loss: {str(err).splitlines()[0]}") from None


def validate(cfg: DictConfig) -> None:
    """Every check of a config before anything is loaded or built (imports torch and Lightning
    for the signatures of the targets and the loss)."""
    check_light(cfg)
    EvalConfig.from_mapping(OmegaConf.to_container(cfg.eval, resolve=True))
    check_targets(cfg)
    check_loss(cfg)
