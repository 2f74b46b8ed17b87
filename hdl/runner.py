"""Train and test one configuration: what one ``hdl-train`` job does, as a library function
(``run``) that the entry point, the sweeps and the tests call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hdl.build import build, build_callbacks, build_loggers, instantiate, trainer_settings


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
        trainer = instantiate(OmegaConf.create(trainer_kwargs), "trainer", **extra)
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
