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
        selected = _load_selected(callbacks, module)
        validation, val_flags = validation_metrics(module, data)
        if cfg.get("test", True):
            if trainer.world_size > 1:  # the whole test set on every rank: exact metrics, logits
                trainer.test(module, dataloaders=_unsharded_test(data), verbose=False)
            else:
                trainer.test(module, datamodule=data, verbose=False)
        metrics = collect_metrics(cfg, trainer, module, data, run_dir, fit_metrics)
        metrics["metrics"].update(validation)  # the selected model's, not the last check's
        metrics["selected"] = selected
        metrics["budget"] = {"steps": int(trainer.global_step), "max_steps": trainer.max_steps}
        metrics["flags"] = val_flags + test_flags(module, data)
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


def _load_selected(callbacks: list, module) -> dict[str, Any]:
    """Load the weights chosen on validation into ``module`` (the model that is tested and
    saved); the last weights when no validation check was eligible (a smoke run), with a
    warning. Returns what was chosen, for ``metrics.json``."""
    from pytorch_lightning.utilities import rank_zero_warn

    from hdl.callbacks import SelectBest

    selector = next(cb for cb in callbacks if isinstance(cb, SelectBest))
    if selector.best_state is None:
        rank_zero_warn(
            "select: no validation check in the final round (a smoke run?); the last weights "
            "are evaluated"
        )
        return selector.selected() | {"step": None, "evaluated": "last"}
    module.load_state_dict(selector.best_state)
    return selector.selected() | {"evaluated": "selected"}


def validation_metrics(module, data) -> tuple[dict[str, float], list[str]]:
    """The selected model on the validation split: natural metrics and robust accuracy under the
    eval attack at every ``eval.eps`` (what model selection across runs reads; correct on the
    clean input and under attack), and collapse flags."""
    from hdl.attacks import evaluate_under_attack, predict
    from hdl.collapse import collapse_flags
    from hdl.keys import metric_key, natural_key

    x, y = data.tensors["val"]
    ev = module.eval_cfg
    classification = data.task == "classification"
    results = evaluate_under_attack(
        module.net,
        x,
        y,
        eps_list=[0.0, *ev.eps],
        attack=ev.attack,
        norm=ev.norm,
        steps=ev.steps,
        input_range=data.input_range,
        task=data.task,
        num_classes=data.num_outputs if classification else None,
        batch_size=data.eval_batch_size,
        queries=ev.square_queries,
    )
    kind, key = ("acc", "accuracy") if classification else ("mse", "mse")
    out = {natural_key("val", kind): results[0.0][key]}
    if classification:
        out["val/loss"] = results[0.0]["loss"]
    for eps in ev.eps:
        out[metric_key("val", ev.attack, kind, eps)] = results[float(eps)][key]
    flags = []
    if classification:
        logits = predict(module.net, x, data.eval_batch_size).cpu().numpy()
        flags = collapse_flags(logits, y.numpy(), "val")
    return out, flags


def test_flags(module, data) -> list[str]:
    """Collapse flags of the test predictions (classification)."""
    import torch

    from hdl.collapse import collapse_flags

    if data.task != "classification" or not module.test_logits:
        return []
    logits = torch.cat(module.test_logits).float().numpy()
    return collapse_flags(logits, torch.cat(module.test_targets).numpy(), "test")


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
