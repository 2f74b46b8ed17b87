"""``hydra/launcher=stacked``: a Hydra launcher that trains the jobs of a multirun whose
structure matches (hdl.stacking) as stacked jobs (hdl.stacked_run), and the others normally,
in ``n_jobs`` worker processes (docs/stacked.md).

    hdl-train -m hydra/launcher=stacked loss=holistic data.split_seed=0,1,2,3,4

Every member still gets its own job folder from Hydra (``.hydra/``, its log) and writes the same
files as a separate run. Hydra only instantiates launchers from the ``hydra_plugins`` package;
:func:`register` makes this one known under :data:`PLUGIN_NAME` (``hdl-train`` calls it).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict, read_write

PLUGIN_NAME = "hydra_plugins.hdl_stacked_launcher.StackedLauncher"
log = logging.getLogger(__name__)


def register() -> None:
    """Make the launcher instantiable by Hydra as ``_target_: PLUGIN_NAME``."""
    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()
    plugins.register(StackedLauncher)
    plugins.class_name_to_class[PLUGIN_NAME] = StackedLauncher


def _default_workers() -> int:
    """One worker per GPU when there are GPUs (``CUDA_VISIBLE_DEVICES``, else the NVIDIA device
    files: no torch import in the launching process), else one per CPU core."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        return max(len([d for d in visible.split(",") if d.strip()]), 1)
    gpus = [p for p in Path("/dev").glob("nvidia[0-9]*")] if visible is None else []
    if gpus:
        return len(gpus)
    return max(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1, 1)


def plan_tasks(
    keys: Sequence[str | None],
    max_members: int,
    workers: int,
    costs: Sequence[float] | None = None,
) -> list[list[int]]:
    """Job indices per task: jobs of one key form groups of at most ``max_members`` (split
    further while there are fewer tasks than workers), jobs without a key run alone. The most
    costly tasks first (the sum of the jobs' ``costs``, default 1 each), so that the workers,
    taking tasks in this order, finish close together."""
    cost = costs if costs is not None else [1.0] * len(keys)
    groups: dict[str, list[int]] = {}
    tasks: list[list[int]] = []
    for index, key in enumerate(keys):
        if key is None:
            tasks.append([index])
        else:
            groups.setdefault(key, []).append(index)
    for members in groups.values():
        parts = max(math.ceil(len(members) / max_members), 1)
        size = math.ceil(len(members) / parts)
        tasks += [members[i : i + size] for i in range(0, len(members), size)]
    while len(tasks) < workers:
        tasks.sort(key=len, reverse=True)
        if len(tasks[0]) < 2:
            break
        big = tasks.pop(0)
        half = math.ceil(len(big) / 2)
        tasks += [big[:half], big[half:]]
    return sorted(tasks, key=lambda task: sum(cost[i] for i in task), reverse=True)


def _job_config(hydra_context: HydraContext, config: DictConfig, overrides, num: int):
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{num}"
        sweep_config.hydra.job.num = num
    return sweep_config


def _warm_up() -> None:
    """Import the training stack in a worker while the launching process still checks and
    composes the jobs."""
    import importlib

    for name in WARM_MODULES:
        importlib.import_module(name)


# what a worker imports before its first job: the training stack, data, models, attacks
WARM_MODULES = (
    "hdl.runner",
    "hdl.stacked_run",
    "hdl.stacked",
    "hdl.data.tabular",
    "hdl.data.images",
    "hdl.models.mlp",
    "hdl.models.cnn",
    "hdl.attacks",
    "torchattacks",
    "hdl.report",
)


def start_workers(n_jobs: int | None = None):
    """The launcher's worker processes, started (and importing) now; the same reusable
    executor is taken again by :meth:`StackedLauncher.launch`."""
    from joblib.externals.loky import get_reusable_executor

    workers = int(n_jobs) if n_jobs else _default_workers()
    executor = get_reusable_executor(max_workers=workers)
    _WARMING.extend(executor.submit(_warm_up) for _ in range(workers))
    return executor


_WARMING: list[Any] = []


def _prepare(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """The task run inside Hydra's job set-up for a member: its folder, ``.hydra/`` files and
    log exist; its config is resolved now, under its own HydraConfig."""
    from hydra.core.hydra_config import HydraConfig

    from hdl.stacked_run import resolved_task

    return resolved_task(cfg), Path(HydraConfig.get().runtime.output_dir)


def _execute(
    task: list[tuple[int, DictConfig]],
    hydra_context: HydraContext,
    task_function: TaskFunction,
    singleton_state: dict[Any, Any],
    sweep_dir: str,
) -> list[JobReturn]:
    """One worker task: a job alone (as Hydra's joblib launcher runs it) or a stacked group.
    ``task`` holds the jobs' composed configs (composed once, by the launcher)."""
    from hydra.core.hydra_config import HydraConfig

    setup_globals()
    Singleton.set_state(singleton_state)
    if len(task) == 1:
        _, sweep_config = task[0]
        HydraConfig.instance().set_config(sweep_config)
        return [
            run_job(
                hydra_context=hydra_context,
                config=sweep_config,
                task_function=task_function,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        ]
    from hdl.stacked_run import group_id, run_stacked

    prepared: list[JobReturn] = []
    for _, sweep_config in task:
        HydraConfig.instance().set_config(sweep_config)
        prepared.append(
            run_job(
                hydra_context=hydra_context,
                config=sweep_config,
                task_function=_prepare,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        )
    jobs = [ret.return_value for ret in prepared]
    group_dir = Path(sweep_dir) / "stacked" / group_id([d for _, d in jobs])
    results = run_stacked(jobs, group_dir=group_dir)
    returns = []
    for ret, (cfg, run_dir), result in zip(prepared, jobs, results, strict=True):
        if isinstance(result, BaseException):
            code = getattr(result, "exit_code", 1)
            print(f"job failed (exit {code}): {run_dir}/error.txt", file=sys.stderr)
            if cfg.get("on_failure", "continue") == "continue":
                ret.return_value = None
            else:
                ret.status = JobStatus.FAILED
                ret.return_value = result
        else:
            objective = cfg.get("optimized_metric")
            ret.return_value = result["metrics"].get(objective) if objective else None
        returns.append(ret)
    return returns


class StackedLauncher(Launcher):
    """Groups a multirun's jobs by stacking key and runs each group as one stacked job."""

    def __init__(self, n_jobs: int | None = None, max_members: int = 64, stack: bool = True):
        self.n_jobs = int(n_jobs) if n_jobs else _default_workers()
        if int(max_members) < 1:
            from hdl.errors import ConfigError

            raise ConfigError(f"hydra.launcher.max_members must be >= 1, got {max_members!r}")
        self.max_members = int(max_members)
        self.stack = bool(stack)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def _compose(
        self, job_overrides: Sequence[Sequence[str]], first: int
    ) -> tuple[list[DictConfig], list[float], list[str | None]]:
        """Every job's composed config (as Hydra's joblib launcher composes it), its relative
        cost and its stacking key (None: the job runs alone)."""
        from hydra.core.hydra_config import HydraConfig

        from hdl.stacked_run import resolved_task
        from hdl.stacking import relative_cost, stacking_key

        configs: list[DictConfig] = []
        costs: list[float] = []
        keys: list[str | None] = []
        saved = HydraConfig.instance().cfg
        try:
            for offset, overrides in enumerate(job_overrides):
                job = _job_config(self.hydra_context, self.config, overrides, first + offset)
                configs.append(job)
                # this job's ${hydra:runtime.output_dir} (run_job sets the same again)
                out = Path(str(job.hydra.sweep.dir)) / str(job.hydra.sweep.subdir)
                with read_write(job.hydra.runtime), open_dict(job.hydra.runtime):
                    job.hydra.runtime.output_dir = str(out.absolute())
                HydraConfig.instance().set_config(job)
                task = resolved_task(job)
                costs.append(relative_cost(task))
                key, reason = stacking_key(task) if self.stack else (None, None)
                if reason is not None:
                    log.info(f"job #{first + offset} runs alone: {reason}")
                keys.append(key)
        finally:
            HydraConfig.instance().cfg = saved
        return configs, costs, keys

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from joblib.externals.loky import get_reusable_executor

        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if not _WARMING:  # hdl-train's sweep callback has started them before its checks
            start_workers(self.n_jobs)
        executor = get_reusable_executor(max_workers=self.n_jobs)
        configs, costs, keys = self._compose(job_overrides, initial_job_idx)
        tasks = plan_tasks(keys, self.max_members, self.n_jobs, costs)
        sizes = ", ".join(str(len(t)) for t in tasks)
        print(
            f"stacked launcher: {len(job_overrides)} jobs as {len(tasks)} tasks "
            f"(members: {sizes}) on {self.n_jobs} workers",
            file=sys.stderr,
        )
        singleton_state = Singleton.get_state()
        work = [[(initial_job_idx + i, configs[i]) for i in task] for task in tasks]
        for future in _WARMING:
            future.result()
        _WARMING.clear()
        futures = [
            executor.submit(
                _execute,
                task,
                self.hydra_context,
                self.task_function,
                singleton_state,
                str(sweep_dir.absolute()),
            )
            for task in work
        ]
        runs = [future.result() for future in futures]
        by_index: dict[int, JobReturn] = {}
        for task, returns in zip(work, runs, strict=True):
            for (num, _), ret in zip(task, returns, strict=True):
                by_index[num] = ret
        return [by_index[initial_job_idx + i] for i in range(len(job_overrides))]
