"""``hdl-train``: the Hydra entry point. Composes the config, validates it, builds data, model,
loss and trainer, fits, tests, and writes ``metrics.json`` into the run directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from hdl.errors import ConfigError, HDLError


def config_dir() -> str:
    """The ``conf/`` folder: shipped inside the package when installed, else the repo's."""
    packaged = Path(__file__).resolve().parent / "conf"
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf")


def _instantiate(node: Any, key: str, drop_name: bool = False, **kwargs: Any) -> Any:
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
    loggers = []
    for key, node in (cfg.get("logger") or {}).items():
        node = OmegaConf.to_container(node, resolve=True)
        if "WandbLogger" in str(node.get("_target_", "")):
            if node.get("offline") is None:
                node["offline"] = wandb_offline()
            if node["offline"] and node.get("log_model"):
                raise ConfigError("logger.wandb.log_model cannot be used in offline mode")
        loggers.append(_instantiate(OmegaConf.create(node), f"logger.{key}"))
    return loggers


def build_callbacks(cfg: DictConfig, loss) -> list:
    from hdl.callbacks import EpochTimer

    callbacks = [
        _instantiate(node, f"callbacks.{key}") for key, node in (cfg.get("callbacks") or {}).items()
    ]
    if loss.sparse.enabled:
        from hdl.sparsity import SparsityCallback

        s = loss.sparse
        callbacks.append(
            SparsityCallback(
                search_rounds=int(s.search_rounds),
                rewind_epoch=int(s.rewind_epoch),
                final_temp=float(s.final_temp),
                mask_init=float(s.mask_init),
            )
        )
    callbacks.append(EpochTimer())
    return callbacks


def build(cfg: DictConfig):
    """Validate ``cfg`` and build (data module with arrays loaded, HolisticModule).

    Shared by training and by ``hdl-eval`` (which rebuilds a run from its saved config)."""
    from hdl.config import validate
    from hdl.losses import HolisticLoss
    from hdl.module import HolisticModule

    validate(cfg)
    data = _instantiate(cfg.data, "data", drop_name=True)
    data.prepare_arrays()  # loads and checks the data before anything trains
    net = _instantiate(
        cfg.model,
        "model",
        drop_name=True,
        input_shape=list(data.input_shape),
        num_outputs=data.num_outputs,
    )
    loss_cfg = OmegaConf.to_container(cfg.loss, resolve=True)
    loss = HolisticLoss(task=data.task, input_range=data.input_range, **loss_cfg)
    optimizer = _instantiate(cfg.optimizer, "optimizer")
    scheduler = _instantiate(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None
    module = HolisticModule(
        net,
        loss,
        optimizer=optimizer,
        scheduler=scheduler,
        eval_eps=list(cfg.eval.eps),
        eval_attack=cfg.eval.attack,
        eval_norm=str(cfg.eval.norm),
        eval_steps=int(cfg.eval.steps),
        input_range=data.input_range,
        num_classes=data.num_outputs if data.task == "classification" else None,
    )
    return data, module


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train and test one configuration; return the metrics written to ``metrics.json``."""
    import pytorch_lightning as pl

    from hdl.report import collect_metrics, print_metrics, write_run_files

    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    data, module = build(cfg)
    loss = module.loss
    callbacks = build_callbacks(cfg, loss)
    loggers = build_loggers(cfg, run_dir)
    trainer = _instantiate(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=cfg.get("ckpt_path"))
        fit_metrics = dict(trainer.callback_metrics)  # trainer.test resets them
        if cfg.get("test", True):
            trainer.test(module, datamodule=data, verbose=False)
        metrics = collect_metrics(cfg, trainer, module, data, run_dir, fit_metrics)
        if trainer.is_global_zero:
            write_run_files(run_dir, metrics, module)
            if cfg.get("print_metrics", True):
                print_metrics(metrics, run_dir)
    finally:
        _finish_wandb(loggers)
    return metrics


def _finish_wandb(loggers: list) -> None:
    """Close the W&B run so the next job of a multirun does not log into it."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        metrics = run(cfg, run_dir)
    except HDLError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    objective = cfg.get("optimized_metric")
    return metrics["metrics"].get(objective) if objective else None


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
