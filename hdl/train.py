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
        loggers.append(_instantiate(OmegaConf.create(node), f"logger.{key}"))
    return loggers


def build_callbacks(cfg: DictConfig, loss) -> list:
    from hdl.callbacks import EpochTimer, RNGState, ShuffleEpoch

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

    ``trainer.gpu_per_job: true`` (preset ``trainer=gpu_per_job``) pins this job to one free
    GPU of the machine, so a sweep run by joblib / submitit-local puts one job on each GPU.
    """
    from hdl.launch import check_ddp_launch, claim_gpu

    node = OmegaConf.to_container(cfg.trainer, resolve=True)
    multirun, job_num = _hydra_job()
    check_ddp_launch(node, multirun)
    claim = None
    if node.pop("gpu_per_job", False):
        import torch

        claim = claim_gpu(job_num, torch.cuda.device_count())
        node.update(accelerator="gpu", devices=[claim.index])
    return node, claim


def _checkpoint_dir(callbacks: list) -> Path | None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            return Path(cb.dirpath)
    return None


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train and test one configuration; return the metrics written to ``metrics.json``.

    With ``resume: true`` a run whose directory already holds a checkpoint (a relaunch after
    preemption, same ``run_id`` or a requeued SLURM job) continues from it. Under DDP every
    rank trains; the test runs on the whole test set on every rank and rank 0 alone writes.
    """
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from hdl.launch import cluster_plugins, rank_deviation
    from hdl.report import collect_metrics, print_metrics, write_run_files
    from hdl.resume import resume_checkpoint

    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(int(cfg.threads))
    trainer_kwargs, gpu_claim = trainer_settings(cfg)
    loggers: list = []
    interrupted = False
    try:
        data, module = build(cfg)
        callbacks = build_callbacks(cfg, module.loss)
        loggers = build_loggers(cfg, run_dir)
        extra: dict[str, Any] = {"callbacks": callbacks, "logger": loggers or False}
        plugins = cluster_plugins()
        if plugins:
            extra["plugins"] = plugins
        trainer = _instantiate(OmegaConf.create(trainer_kwargs), "trainer", **extra)
        ckpt_path = cfg.get("ckpt_path")
        if not ckpt_path and cfg.get("resume", False):
            found = resume_checkpoint(_checkpoint_dir(callbacks))
            ckpt_path = str(found) if found else None
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        fit_metrics = dict(trainer.callback_metrics)  # trainer.test resets them
        deviation = rank_deviation(trainer, module) if trainer.world_size > 1 else None
        if cfg.get("test", True):
            if trainer.world_size > 1:  # the whole test set on every rank: exact metrics, logits
                trainer.test(module, dataloaders=_unsharded_test(data), verbose=False)
            else:
                trainer.test(module, datamodule=data, verbose=False)
        metrics = collect_metrics(cfg, trainer, module, data, run_dir, fit_metrics)
        if cfg.get("objective"):
            from hdl.objective import holistic_objective

            objective = holistic_objective(metrics["metrics"], module, data, cfg.objective)
            metrics["metrics"].update(objective)
            if trainer.is_global_zero:  # W&B sweeps read the objective from the run's summary
                for lg in loggers:
                    lg.log_metrics(objective, step=trainer.global_step)
                    lg.save()
        metrics["resumed_from"] = ckpt_path
        if deviation is not None:
            metrics["distributed"] = {
                "world_size": trainer.world_size,
                "max_rank_deviation": deviation,
            }
        if trainer.is_global_zero:
            write_run_files(run_dir, metrics, module)
        _finish_wandb(loggers)  # before the table: W&B prints its own summary when it closes
        if trainer.is_global_zero and cfg.get("print_metrics", True):
            print_metrics(metrics, run_dir)
    except SIGTERMException:
        interrupted = True
        raise
    finally:
        _finish_wandb(loggers, interrupted)
        if gpu_claim is not None:
            gpu_claim.release()
    return metrics


def _unsharded_test(data):
    from hdl.data.base import IndexBatches

    x, y = data.tensors["test"]
    return IndexBatches(x, y, data.eval_batch_size, shuffle=False)


def _finish_wandb(loggers: list, interrupted: bool = False) -> None:
    """Close the W&B run so the next job of a multirun does not log into it; a run stopped
    by SIGTERM is marked preempting, and its relaunch resumes it (same id)."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        if interrupted and wandb.run is not None:
            wandb.mark_preempting()
        wandb.finish(exit_code=143 if interrupted else None)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    try:
        metrics = run(cfg, run_dir)
    except HDLError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except SIGTERMException:
        # stopped (preemption, scancel, SLURM time limit): relaunch with the same run_id resumes
        print(f"stopped by SIGTERM; resume with the same overrides: {run_dir}", file=sys.stderr)
        sys.exit(143)
    objective = cfg.get("optimized_metric")
    return metrics["metrics"].get(objective) if objective else None


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
