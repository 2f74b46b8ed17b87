"""Train and test one configuration: what one ``hdl-train`` job does, as a library function
(``run``) that the entry point, the sweeps and the tests call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hdl.build import build, build_callbacks, build_loggers, instantiate, trainer_settings
from hdl.errors import ConfigError, HDLError, NonFiniteError


def _checkpoint_dir(callbacks: list) -> Path | None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            return Path(cb.dirpath)
    return None


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train and test one configuration; return the metrics written to ``metrics.json``.

    With ``resume: true`` a run whose directory already holds a checkpoint (a relaunch after
    preemption, same ``run_id`` or a requeued SLURM job) continues from it, provided the
    directory's ``identity.json`` matches this configuration (docs/runs.md). Under DDP every
    rank trains; the test runs on the whole test set on every rank and rank 0 alone writes.
    With ``train: false`` the checkpoint ``ckpt_path`` is only tested (an eval-only run).

    A failure is recorded in ``run_dir`` (``error.txt`` and the log; :mod:`hdl.failures`) and
    re-raised; a NaN or infinite loss raises :class:`NonFiniteError` (exit code 3).
    """
    from hdl.failures import clear_failure, record_failure

    run_dir = Path(run_dir)
    try:
        from hdl.config import check_light
        from hdl.identity import check_identity

        check_light(cfg)  # before torch.set_num_threads and anything else
        check_identity(run_dir, cfg)  # before anything in the folder is touched
        if _rank() == 0:
            clear_failure(run_dir)
        return _run(cfg, run_dir)
    except HDLError as err:
        if _rank() == 0:
            record_failure(run_dir, str(err), err.exit_code)
        err.recorded = True
        raise
    except Exception as err:
        import traceback

        if _rank() == 0:
            record_failure(run_dir, f"{type(err).__name__}: {err}", 1, traceback.format_exc())
        err.recorded = True
        raise


def _rank() -> int:
    import os

    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from hdl.identity import write_identity
    from hdl.launch import cluster_plugins, rank_deviation
    from hdl.resume import resume_checkpoint

    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(int(cfg.threads))
    trainer_kwargs, gpu_claim = trainer_settings(cfg)
    loggers: list = []
    interrupted = failed = False
    try:
        data, module = build(cfg)
        if not cfg.get("train", True):
            return _evaluate_only(cfg, run_dir, data, module, trainer_kwargs)
        callbacks = build_callbacks(cfg, module.loss)
        loggers = build_loggers(cfg, run_dir)
        extra: dict[str, Any] = {"callbacks": callbacks, "logger": loggers or False}
        plugins = cluster_plugins()
        if plugins:
            extra["plugins"] = plugins
        trainer = instantiate(OmegaConf.create(trainer_kwargs), "trainer", **extra)
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path:  # given: it must load, fit this model, and be of this configuration
            resumed = check_checkpoint(ckpt_path, module, cfg, explicit=True)
        else:
            found = resume_checkpoint(_checkpoint_dir(callbacks)) if cfg.get("resume") else None
            ckpt_path = str(found) if found else None
            resumed = check_checkpoint(ckpt_path, module, cfg) if found else None
        if trainer.is_global_zero:
            write_identity(run_dir, cfg)
            if resumed is not None:  # CSVLogger rewrites metrics.csv: keep the rows so far
                keep_csv_history(loggers, int(resumed.get("global_step") or 0))
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        fit_metrics = dict(trainer.callback_metrics)  # trainer.test resets them
        deviation = rank_deviation(trainer, module) if trainer.world_size > 1 else None
        selected = _load_selected(callbacks, module)
        metrics = finish_run(
            cfg,
            run_dir,
            module,
            data,
            trainer,
            loggers,
            fit_metrics,
            selected,
            ckpt_path,
            deviation,
        )
    except SIGTERMException:
        interrupted = True
        raise
    except BaseException:
        failed = True
        raise
    finally:
        _finish_wandb(loggers, interrupted, failed)
        if gpu_claim is not None:
            gpu_claim.release()
    return metrics


def finish_run(
    cfg: DictConfig,
    run_dir: Path,
    module,
    data,
    trainer,
    loggers: list,
    fit_metrics: dict,
    selected: dict,
    resumed_from: str | None,
    deviation: float | None = None,
    test_trainer=None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """After training: the selected model (already loaded in ``module``) on validation and
    test, ``metrics.json`` and the run files, the loggers closed, the table printed. One run
    calls it with its own trainer; a member of a stacked job (hdl.stacked_run) with the stacked
    job's trainer (steps, epochs, timing) and a ``test_trainer`` of its own (its loggers)."""
    from hdl.report import collect_metrics, print_metrics, write_run_files

    tester = test_trainer if test_trainer is not None else trainer
    validation, val_flags = validation_metrics(module, data)
    if cfg.get("test", True):
        if tester.world_size > 1:  # the whole test set on every rank: exact metrics, logits
            tester.test(module, dataloaders=_unsharded_test(data), verbose=False)
        else:
            tester.test(module, datamodule=data, verbose=False)
    metrics = collect_metrics(cfg, trainer, module, data, run_dir, fit_metrics)
    metrics["metrics"].update(validation)  # the selected model's, not the last check's
    check_finite_metrics(metrics["metrics"])
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
    metrics["resumed_from"] = resumed_from
    metrics.update(extra or {})
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
    return metrics


def _evaluate_only(cfg: DictConfig, run_dir: Path, data, module, trainer_kwargs) -> dict[str, Any]:
    """``train: false``: load ``ckpt_path`` (a training checkpoint or a ``selected.ckpt``) and
    run the test loop and the validation metrics on it; ``metrics.json`` says ``eval_only``."""
    from hdl.identity import write_identity
    from hdl.report import collect_metrics, print_metrics, write_run_files

    ckpt_path = str(cfg.ckpt_path)
    state = check_checkpoint(ckpt_path, module, cfg, resume_training=False)
    module.load_state_dict(state["state_dict"])
    callbacks = build_callbacks(cfg, module.loss, hdl_callbacks=False)
    loggers = build_loggers(cfg, run_dir)
    trainer = instantiate(
        OmegaConf.create(trainer_kwargs), "trainer", callbacks=callbacks, logger=loggers or False
    )
    failed = False
    try:
        if trainer.is_global_zero:
            write_identity(run_dir, cfg)
        validation, val_flags = validation_metrics(module, data)
        trainer.test(module, datamodule=data, verbose=False)
        metrics = collect_metrics(cfg, trainer, module, data, run_dir, {})
        metrics["metrics"].update(validation)
        check_finite_metrics(metrics["metrics"])
        metrics["eval_only"] = True
        metrics["checkpoint"] = ckpt_path
        chosen = state.get("selected") if isinstance(state.get("selected"), dict) else {}
        # the training the checkpoint holds (a selected.ckpt knows the step it was chosen at)
        step = state.get("global_step", chosen.get("step"))
        metrics["epochs"] = state.get("epoch", chosen.get("epoch"))
        metrics["global_step"] = int(step) if step is not None else None
        metrics["selected"] = {**chosen, "evaluated": "checkpoint", "checkpoint": ckpt_path}
        metrics["flags"] = val_flags + test_flags(module, data)
        metrics["resumed_from"] = None
        if trainer.is_global_zero:
            write_run_files(run_dir, metrics, module)
        _finish_wandb(loggers)
        if trainer.is_global_zero and cfg.get("print_metrics", True):
            print_metrics(metrics, run_dir)
    except BaseException:
        failed = True
        raise
    finally:
        _finish_wandb(loggers, failed=failed)
    return metrics


def check_checkpoint(
    path: str | Path, module, cfg: DictConfig, explicit: bool = False, resume_training: bool = True
) -> dict[str, Any]:
    """Load ``path`` and check it before Lightning does: readable, a checkpoint of this model
    (same weights and shapes), resumable (training state) when training resumes from it, and,
    for a ``ckpt_path`` of another run folder, of the same configuration (its identity).
    One-line ConfigError otherwise; returns the loaded checkpoint."""
    from hdl.errors import DataError
    from hdl.runs import read_checkpoint

    path = Path(path)
    try:
        state = read_checkpoint(path)  # the one reader: readable, with model weights
    except DataError as err:
        raise ConfigError(f"ckpt_path: {err}") from None
    if resume_training and "loops" not in state:
        raise ConfigError(
            f"ckpt_path: {path} holds weights only, not a training state: evaluate it with "
            "train=false, or resume from <run dir>/checkpoints/last.ckpt"
        )
    mismatch = state_dict_mismatch(module.state_dict(), state["state_dict"])
    if mismatch:
        raise ConfigError(
            f"ckpt_path: {path} does not fit this configuration ({mismatch}): a checkpoint of "
            "another model or loss"
        )
    if explicit and resume_training:
        from hdl.identity import identity_config, identity_hash, read_identity

        folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        saved = read_identity(folder)
        current = identity_config(cfg)
        if saved is not None and saved.get("hash") != identity_hash(current):
            from hdl.identity import differences

            diffs = differences(saved["config"], current)
            if diffs:
                raise ConfigError(
                    f"ckpt_path: {path} is a checkpoint of another configuration (differs: "
                    + "; ".join(diffs[:4])
                    + "): resuming it would label its training with this configuration"
                )
    return state


def state_dict_mismatch(expected: dict, found: dict) -> str:
    """What differs between two state dicts (missing / unexpected keys, shapes); '' if none."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k}: {list(found[k].shape)} vs {list(expected[k].shape)} here"
        for k in expected
        if k in found
        and hasattr(found[k], "shape")
        and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if missing:
        parts.append("missing " + ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else ""))
    if unexpected:
        parts.append(
            "unexpected " + ", ".join(unexpected[:3]) + (" ..." if len(unexpected) > 3 else "")
        )
    if shapes:
        parts.append("shape of " + "; ".join(shapes[:2]) + (" ..." if len(shapes) > 2 else ""))
    return "; ".join(parts)


def check_finite_metrics(metrics: dict[str, float]) -> None:
    """A NaN or infinite test / validation metric stops the run before anything is written."""
    import math

    bad = [
        k
        for k, v in metrics.items()
        if k.startswith(("test/", "val/")) and isinstance(v, float) and not math.isfinite(v)
    ]
    if bad:
        shown = ", ".join(f"{k}={metrics[k]}" for k in bad[:4])
        raise NonFiniteError(f"non-finite metrics ({shown}): nothing is reported as a result")


def keep_csv_history(loggers: list, before_step: int) -> None:
    """Lightning's CSVLogger deletes ``metrics.csv`` when its writer starts: a resumed run puts
    back the rows logged before its checkpoint (step < the checkpoint's step; an earlier test
    row too), so the log of every epoch survives every resume."""
    import csv
    import math

    from pytorch_lightning.loggers import CSVLogger

    for lg in loggers:
        if not isinstance(lg, CSVLogger):
            continue
        path = Path(lg.log_dir) / "metrics.csv"
        rows: list[dict[str, str]] = []
        if path.is_file():
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        writer = lg.experiment  # starts the writer (which removes the file)
        if not rows or not hasattr(writer, "metrics_file_path"):
            continue

        def step(row: dict[str, str]) -> float:
            try:
                return float(row.get("step") or "nan")
            except ValueError:
                return math.nan

        kept = [
            r
            for r in rows
            if step(r) < before_step or any(k.startswith("test/") and v for k, v in r.items())
        ]
        if kept:
            writer.metrics = [{k: v for k, v in r.items() if k is not None} for r in kept]
            writer.save()


def _load_selected(callbacks: list, module) -> dict[str, Any]:
    from hdl.callbacks import SelectBest

    selector = next(cb for cb in callbacks if isinstance(cb, SelectBest))
    return load_selection(selector.selection, module)


def load_selection(selection, module) -> dict[str, Any]:
    """Load the weights chosen on validation (a :class:`hdl.callbacks.Selection`) into
    ``module`` (the model that is tested and saved); ``module`` keeps the last weights when no
    validation check was eligible (a smoke run), with a warning. Returns what was chosen, for
    ``metrics.json``. One run and each member of a stacked job (hdl.stacked_run) use it."""
    from pytorch_lightning.utilities import rank_zero_warn

    if selection.best_state is None:
        rank_zero_warn(
            "select: no validation check in the final round (a smoke run?); the last weights "
            "are evaluated"
        )
        return selection.selected() | {"step": None, "evaluated": "last"}
    module.load_state_dict(selection.best_state)
    return selection.selected() | {"evaluated": "selected"}


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


def _finish_wandb(loggers: list, interrupted: bool = False, failed: bool = False) -> None:
    """Close the W&B run so the next job of a multirun does not log into it; a run stopped
    by SIGTERM is marked preempting, and its relaunch resumes it (same id); a failed run is
    marked failed."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        if interrupted and wandb.run is not None:
            wandb.mark_preempting()
        wandb.finish(exit_code=143 if interrupted else 1 if failed else None)
