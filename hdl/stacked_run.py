"""Run a group of jobs as one stacked job (docs/stacked.md): build every member exactly as its
own run would (same seed, split, init), train them together (:class:`hdl.stacked.StackedModule`),
then finish each member as its own run: its selected weights, validation and test metrics,
``metrics.json``, predictions, weights, ``selected.ckpt`` and its loggers, in its own folder."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hdl.errors import HDLError


def group_id(run_dirs: Sequence[Path]) -> str:
    """A stable name for a group of member folders (its checkpoint folder)."""
    text = "\n".join(str(Path(d).absolute()) for d in run_dirs)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def resolved_task(cfg: DictConfig) -> DictConfig:
    """The job's config without its ``hydra`` node, every interpolation resolved now (under the
    HydraConfig of this job): a stacked job holds several members' configs at once, and a
    ``${hydra:runtime.output_dir}`` resolved later would name another member's folder."""
    from omegaconf import open_dict

    task = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(task):
        task.pop("hydra", None)
    return task


def _record(run_dir: Path, err: BaseException) -> None:
    import traceback

    from hdl.failures import record_failure

    if isinstance(err, HDLError):
        record_failure(run_dir, str(err), err.exit_code)
    else:
        record_failure(run_dir, f"{type(err).__name__}: {err}", 1, traceback.format_exc())


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    import torch

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def run_stacked(
    jobs: Sequence[tuple[DictConfig, Path]], group_dir: Path | None = None
) -> list[dict[str, Any] | BaseException]:
    """Train ``jobs`` ((config, run folder) pairs of one stacking key, hdl.stacking) as one
    stacked job; return each member's metrics, or the error it failed with (also recorded in
    its folder as ``error.txt``, as a failed run would). ``group_dir`` keeps the stacked job's
    ``last.ckpt`` (a relaunch resumes from it when every member's identity still matches)."""
    import pytorch_lightning as pl
    import torch

    from hdl.build import build
    from hdl.config import check_light
    from hdl.console import quiet
    from hdl.failures import clear_failure
    from hdl.identity import check_identity

    quiet(any(cfg.get("verbose") is True for cfg, _ in jobs))
    results: list[dict[str, Any] | BaseException | None] = [None] * len(jobs)
    members: list[tuple[int, DictConfig, Path, Any, Any, dict]] = []
    for index, (cfg, run_dir) in enumerate(jobs):
        run_dir = Path(run_dir)
        try:
            check_light(cfg)
            check_identity(run_dir, cfg)
            clear_failure(run_dir)
            if cfg.get("threads"):
                torch.set_num_threads(int(cfg.threads))
            pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
            data, module = build(cfg)
            # what the global RNG holds after this member's set-up, as when it runs alone: its
            # evaluation (attack random starts) draws from it
            members.append((index, cfg, run_dir, data, module, _rng_state()))
        except Exception as err:  # noqa: BLE001 - this member fails, the others go on
            _record(run_dir, err)
            results[index] = err
    if not members:
        return results  # type: ignore[return-value]
    try:
        _train_and_finish(members, results, group_dir)
    except Exception as err:  # noqa: BLE001 - the stacked training failed: every member did
        for index, _, run_dir, *_ in members:
            if results[index] is None:
                _record(run_dir, err)
                results[index] = err
    for index, _cfg, run_dir, *_ in members:
        if results[index] is None:  # cannot happen; never report a member without an outcome
            results[index] = RuntimeError(f"stacked: no result for {run_dir}")
    return results  # type: ignore[return-value]


def _train_and_finish(members, results, group_dir: Path | None) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar

    from hdl.budget import SelectConfig
    from hdl.build import build_callbacks, instantiate, trainer_settings
    from hdl.callbacks import SelectBest
    from hdl.config import plain
    from hdl.identity import write_identity
    from hdl.stacked import StackedData, StackedModule, StackedSelectBest

    _, cfg0, *_ = members[0]
    modules = [m[4] for m in members]
    stacked = StackedModule(modules)
    data = StackedData([m[3] for m in members])
    trainer_kwargs, gpu_claim = trainer_settings(cfg0)
    # per member below (selection), the group's (checkpoint), or none: one progress bar for N
    # members in a worker process of a sweep tells little and costs a millisecond a step
    callbacks = [
        cb
        for cb in build_callbacks(cfg0, stacked.loss)
        if not isinstance(cb, ModelCheckpoint | SelectBest | ProgressBar)
    ]
    trainer_kwargs["enable_progress_bar"] = False
    select = SelectConfig.from_mapping(plain(cfg0.get("select")))
    selector = StackedSelectBest(len(modules), select.monitor, select.mode, select.patience)
    callbacks.append(selector)
    ckpt_path = None
    if group_dir is not None:
        callbacks.append(
            ModelCheckpoint(
                dirpath=str(group_dir),
                filename="last",
                monitor=None,
                save_top_k=1,
                enable_version_counter=False,
            )
        )
        last = Path(group_dir) / "last.ckpt"
        if cfg0.get("resume") and last.is_file():
            ckpt_path = str(last)
    trainer = instantiate(
        OmegaConf.create(trainer_kwargs), "trainer", callbacks=callbacks, logger=False
    )
    try:
        for _, cfg, run_dir, *_ in members:
            write_identity(run_dir, cfg)
        trainer.fit(stacked, datamodule=data, ckpt_path=ckpt_path)
        if group_dir is not None:  # the finished state, with the last epoch's member logs
            trainer.save_checkpoint(str(Path(group_dir) / "last.ckpt"))
        _write_member_checkpoints(trainer, stacked, selector, members)
        shared = {
            k: v for k, v in trainer.callback_metrics.items() if str(k).startswith("sparsity/")
        }
        for i, (index, cfg, run_dir, member_data, module, rng) in enumerate(members):
            try:
                results[index] = _finish_member(
                    i,
                    cfg,
                    run_dir,
                    member_data,
                    module,
                    rng,
                    stacked,
                    selector,
                    trainer,
                    shared,
                    ckpt_path,
                    len(members),
                )
            except Exception as err:  # noqa: BLE001 - this member fails, the others go on
                _record(run_dir, err)
                results[index] = err
    finally:
        if gpu_claim is not None:
            gpu_claim.release()


def _write_member_checkpoints(trainer, stacked, selector, members) -> None:
    """Each member's ``checkpoints/last.ckpt`` (where its run's ModelCheckpoint would write),
    cut from the stacked job's final state: a run of the member's configuration resumes from
    it, alone (a longer ``trainer.max_epochs``, say)."""
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint

    from hdl.build import build_callbacks
    from hdl.stacked import member_checkpoint

    full = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    for i, (_, cfg, _, _, module, _) in enumerate(members):
        saver = next(
            (c for c in build_callbacks(cfg, module.loss, False) if isinstance(c, ModelCheckpoint)),
            None,
        )
        if saver is None or not saver.dirpath:
            continue
        path = Path(saver.dirpath) / f"{saver.filename or 'last'}.ckpt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(member_checkpoint(full, stacked, selector, i, str(saver.dirpath)), path)


def _finish_member(
    i, cfg, run_dir, data, module, rng, stacked, selector, trainer, shared, resumed_from, size
) -> dict[str, Any]:
    import pytorch_lightning as pl

    from hdl.build import build_loggers
    from hdl.runner import _finish_wandb, finish_run, load_selection

    module.load_state_dict(stacked.member_state_dict(i))  # the last weights, as a run ends
    selected = load_selection(selector.selections[i], module)
    module.to(stacked.device)
    fit_metrics: dict[str, Any] = dict(shared)
    for entry in stacked.history:  # the last epoch's training terms and the last check's values
        fit_metrics.update(
            {k: float(v[i]) for k, v in entry.items() if k.startswith(("train/", "val/"))}
        )
    loggers = build_loggers(cfg, run_dir)
    failed = False
    try:
        for entry in stacked.history:
            row = {k: float(v[i]) for k, v in entry.items() if k.startswith(("train/", "val/"))}
            for lg in loggers:
                lg.log_metrics(row | {"epoch": entry["epoch"]}, step=entry["step"])
        cuda = stacked.device.type == "cuda"
        tester = pl.Trainer(
            accelerator="gpu" if cuda else "cpu",
            devices=[stacked.device.index or 0] if cuda else 1,
            logger=loggers or False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            inference_mode=False,
            default_root_dir=str(run_dir),
        )
        tester.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step  # log step
        _set_rng_state(rng)
        extra = {"stacked": {"members": size, "member": i}}
        return finish_run(
            cfg,
            run_dir,
            module,
            data,
            trainer,
            loggers,
            fit_metrics,
            selected,
            resumed_from,
            test_trainer=tester,
            extra=extra,
        )
    except BaseException:
        failed = True
        raise
    finally:
        _finish_wandb(loggers, failed=failed)
