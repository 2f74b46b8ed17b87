"""The assembly room: the config directory, instantiation with errors that name the key, and
``build()`` (validated config -> data module + HolisticModule), plus the loggers and callbacks of
a run. Shared by ``hdl-train``, ``hdl-eval``, ``hdl-bench`` and the tests (docs/architecture.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hdl.config import config_dir
from hdl.errors import ConfigError, HDLError

__all__ = ["config_dir", "load_preset", "instantiate", "build"]


def load_preset(group: str, name: str) -> dict[str, Any]:
    """A config group's preset as a plain dict, composed by Hydra (so a preset that extends
    another through its ``defaults:`` list comes out whole), e.g. ``load_preset("loss", "robust")``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if not (Path(config_dir()) / group / f"{name}.yaml").is_file():
        raise ConfigError(f"{group}={name}: no such preset in {config_dir()}/{group}")
    hydra = GlobalHydra.instance()
    was_initialised = hydra.is_initialized()
    if not was_initialised:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(f"{group}/{name}")
    else:  # inside a running Hydra app: use its config search path
        cfg = compose(f"{group}/{name}")
    node = cfg[group] if group in cfg else cfg
    return OmegaConf.to_container(node, resolve=True)


def instantiate(node: Any, key: str, drop_name: bool = False, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with errors that name the config key; ``drop_name`` removes
    the ``name`` label that data and model presets carry for run names."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    node = OmegaConf.to_container(node, resolve=True)
    if drop_name:
        node.pop("name", None)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, HDLError):
            raise cause from None
        message = str(cause or err).splitlines()[0] if str(cause or err) else repr(cause)
        raise ConfigError(f"{key}: {message}") from None


def wandb_offline() -> bool:
    """Offline unless the user has configured W&B (WANDB_MODE, an API key, or a login)."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("offline", "dryrun")
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path.home() / ".netrc"
    return not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    """Loggers from ``cfg.logger``. W&B gets a run id fixed by the run directory and
    ``resume="allow"``, so a relaunched (preempted) run continues its W&B run instead of
    starting a second one; under a W&B sweep agent the agent's run id is kept."""
    from hdl.resume import wandb_run_id

    loggers = []
    for key, node in (cfg.get("logger") or {}).items():
        node = OmegaConf.to_container(node, resolve=True)
        if "WandbLogger" in str(node.get("_target_", "")):
            if node.get("offline") is None:
                node["offline"] = wandb_offline()
            if node["offline"] and node.get("log_model"):
                raise ConfigError("logger.wandb.log_model cannot be used in offline mode")
            if node.get("id") is None and not os.environ.get("WANDB_RUN_ID"):
                node["id"] = wandb_run_id(run_dir)
            node.setdefault("resume", "allow")
        logger = instantiate(OmegaConf.create(node), f"logger.{key}")
        init = getattr(logger, "_wandb_init", None)
        if isinstance(init, dict) and init.get("anonymous") is None:
            # Lightning passes anonymous=None, which W&B answers with a deprecation warning on
            # every run (before WANDB_SILENT applies); None is W&B's default anyway
            init.pop("anonymous", None)
        loggers.append(logger)
    return loggers


def build_callbacks(cfg: DictConfig, loss, hdl_callbacks: bool = True) -> list:
    """The configured callbacks, then the ones every run has: the sparsity schedule (when the
    term is on), model selection on validation, the epoch timer, RNG state and shuffling
    (``hdl_callbacks=False``: the configured ones only, for a test-only run)."""
    from hdl.budget import Budget, SelectConfig
    from hdl.callbacks import EpochTimer, RNGState, SelectBest, ShuffleEpoch
    from hdl.config import plain

    callbacks = [  # a callback set to null in a config (or on the command line) is left out
        instantiate(node, f"callbacks.{key}")
        for key, node in (cfg.get("callbacks") or {}).items()
        if node is not None
    ]
    if not hdl_callbacks:
        return callbacks
    if loss.sparse.enabled:
        budget = Budget.from_mapping(plain(cfg.get("budget")))
        callbacks.append(loss.sparse.callback(budget.min_round_steps))
    select = SelectConfig.from_mapping(plain(cfg.get("select")))
    callbacks.append(SelectBest(select.monitor, select.mode, select.patience))
    callbacks += [EpochTimer(), RNGState(), ShuffleEpoch()]
    return callbacks


def build(cfg: DictConfig):
    """Validate ``cfg`` and build (data module with arrays loaded, HolisticModule).

    Shared by training and by ``hdl-eval`` (which rebuilds a run from its saved config)."""
    from hdl.config import validate
    from hdl.eval_config import EvalConfig
    from hdl.losses import HolisticLoss
    from hdl.module import HolisticModule

    validate(cfg)
    data = instantiate(cfg.data, "data", drop_name=True)
    data.prepare_arrays()  # loads and checks the data before anything trains
    net = instantiate(
        cfg.model,
        "model",
        drop_name=True,
        input_shape=list(data.input_shape),
        num_outputs=data.num_outputs,
    )
    loss_cfg = OmegaConf.to_container(cfg.loss, resolve=True)
    loss = HolisticLoss(task=data.task, input_range=data.input_range, **loss_cfg)
    optimizer = instantiate(cfg.optimizer, "optimizer")
    scheduler = instantiate(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None
    module = HolisticModule(
        net,
        loss,
        optimizer=optimizer,
        scheduler=scheduler,
        eval_cfg=EvalConfig.from_mapping(OmegaConf.to_container(cfg.eval, resolve=True)),
        input_range=data.input_range,
        num_classes=data.num_outputs if data.task == "classification" else None,
    )
    return data, module


def _hydra_job() -> tuple[bool, int]:
    """(inside a multirun?, job number) from Hydra's runtime config; (False, 0) outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False, 0
    hc = HydraConfig.get()
    num = OmegaConf.select(hc, "job.num", default=0, throw_on_missing=False)
    return hc.mode == RunMode.MULTIRUN, int(num or 0)


def trainer_settings(cfg: DictConfig) -> tuple[dict[str, Any], Any]:
    """The trainer node as keyword arguments, and the GPU claim it holds (or None).

    A step budget (``budget.steps``) replaces the epoch budget: ``max_steps``, unlimited
    epochs, validation every ``total / budget.val_checks`` steps (:class:`hdl.budget.Budget`).

    ``trainer.gpu_per_job: true`` (preset ``trainer=gpu_per_job``) pins this job to one free
    GPU of the machine, so a sweep run by joblib / submitit-local puts one job on each GPU.
    """
    from hdl.budget import Budget
    from hdl.config import plain
    from hdl.launch import check_ddp_launch, claim_gpu

    node = OmegaConf.to_container(cfg.trainer, resolve=True)
    search_rounds = OmegaConf.select(cfg, "loss.sparse.search_rounds", default=0) or 0
    node.update(Budget.from_mapping(plain(cfg.get("budget"))).trainer_overrides(search_rounds))
    multirun, job_num = _hydra_job()
    check_ddp_launch(node, multirun)
    claim = None
    if node.pop("gpu_per_job", False):
        import torch

        claim = claim_gpu(job_num, torch.cuda.device_count())
        node.update(accelerator="gpu", devices=[claim.index])
    return node, claim
