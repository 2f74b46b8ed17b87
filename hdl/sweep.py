"""The Hydra callback of ``hdl-train`` (``hydra.callbacks.hdl`` in conf/train.yaml): run identity
before Hydra writes into a run folder, and the failure policy of sweeps (docs/runs.md).

- ``on_run_start``: a single run whose folder holds another configuration's run is refused
  (one line, exit 2) before Hydra overwrites its ``.hydra/`` files.
- ``on_multirun_start``: every job of the sweep is composed (the basic sweeper's job list: its
  ``params`` and the command line's sweep overrides) and checked, configuration and identity,
  before the first job starts; any error stops the sweep there (one line per job, exit 2).
- ``on_multirun_end``: the summary, naming each failed job, its exit code and its ``error.txt``;
  written to ``<sweep dir>/sweep_summary.json``. ``hdl-train`` then exits 4 if a job failed.

Whether the other jobs still run after one fails is ``on_failure`` (``continue`` | ``stop``).
Light: no torch.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from hdl.errors import EXIT_CONFIG, HDLError

# what the last sweep of this process ended with (hdl.train reads it for its exit code)
LAST_SUMMARY: dict[str, Any] | None = None


def _task_config(cfg: DictConfig) -> DictConfig:
    task = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(task):
        task.pop("hydra", None)
    return task


def _run_dir(cfg: DictConfig) -> Path | None:
    try:
        return Path(str(OmegaConf.select(cfg, "hydra.run.dir"))).absolute()
    except Exception:  # noqa: BLE001 - an unresolvable name: the job itself reports it
        return None


def refuse_other_identity(run_dir: Path, cfg: DictConfig) -> None:
    """ConfigError when ``run_dir`` holds a run of another configuration; the refusal is also
    written to that folder's log (not to its error.txt: that run did not fail)."""
    from hdl.failures import _log_to_run_folder
    from hdl.identity import check_identity

    try:
        check_identity(run_dir, cfg)
    except HDLError as err:
        _log_to_run_folder(run_dir, f"relaunch refused: {err}")
        raise


def _memo_load_sweep_config(load, master_config: DictConfig, sweep_overrides: list[str]):
    key = (id(master_config), tuple(sweep_overrides))
    if key not in _COMPOSED:
        _COMPOSED[key] = load(master_config, sweep_overrides)
    return copy.deepcopy(_COMPOSED[key])  # callers set job numbers and folders on their copy


_COMPOSED: dict[tuple[int, tuple[str, ...]], DictConfig] = {}


def memoize_sweep_configs() -> None:
    """Compose each job of this process's sweep once: the checks below, Hydra's basic sweeper
    (``validate_batch_is_legal``) and the launcher each compose every job, about 0.3 s a job.
    The composition depends only on the sweep's config and the job's overrides; each caller
    gets its own deep copy (20 ms)."""
    import functools

    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    if isinstance(loader.__dict__.get("load_sweep_config"), functools.partial):
        return
    original = loader.load_sweep_config
    loader.load_sweep_config = functools.partial(_memo_load_sweep_config, original)


def job_overrides(config: DictConfig) -> list[list[str]] | None:
    """The override list of every job, in launch order, as Hydra's basic sweeper makes them
    (None for another sweeper, e.g. Optuna, whose trials are not known in advance)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
    if not target.endswith("BasicSweeper"):
        return None
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    arguments = [f"{k}={v}" for k, v in params.items()]
    arguments += list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    loader = GlobalHydra.instance().config_loader()
    parser = OverridesParser.create(config_loader=loader)
    batches = BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)
    return [list(job) for batch in batches for job in batch]


def compose_job(config: DictConfig, overrides: list[str], num: int) -> tuple[DictConfig, Path]:
    """The job's config as the launcher will compose it, and its folder."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    job = loader.load_sweep_config(config, list(overrides))
    with open_dict(job):
        job.hydra.job.id = num
        job.hydra.job.num = num
    job_dir = Path(str(job.hydra.sweep.dir)) / str(job.hydra.sweep.subdir)
    with read_write(job.hydra.runtime), open_dict(job.hydra.runtime):
        job.hydra.runtime.output_dir = str(job_dir.absolute())
    return job, job_dir.absolute()


def check_jobs(config: DictConfig) -> list[dict[str, Any]]:
    """Compose and check every job; raise one ConfigError listing the jobs that cannot run."""
    from hydra.core.hydra_config import HydraConfig

    from hdl.config import validate

    all_overrides = job_overrides(config)
    if all_overrides is None:  # another sweeper (Optuna): check the configuration it starts from
        master = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
        OmegaConf.copy_cache(from_config=config, to_config=master)
        with read_write(master.hydra.runtime), open_dict(master.hydra.runtime):
            master.hydra.runtime.output_dir = str(Path(str(config.hydra.sweep.dir)).absolute())
        saved = HydraConfig.instance().cfg
        try:
            HydraConfig.instance().set_config(master)
            validate(_task_config(master))
        except HDLError as err:
            raise SweepConfigError([f"the sweep's configuration: {err}"], 1) from None
        finally:
            HydraConfig.instance().cfg = saved
        return []
    jobs, errors = [], []
    hydra_config = HydraConfig.instance()
    saved = hydra_config.cfg
    try:
        for num, overrides in enumerate(all_overrides):
            try:
                job, job_dir = compose_job(config, overrides, num)
                hydra_config.set_config(job)  # ${hydra:runtime.output_dir} of this job
                task = _task_config(job)
                validate(task)  # as hdl-train will, before the data are loaded
                refuse_other_identity(job_dir, task)
            except HDLError as err:
                errors.append(f"job #{num} ({' '.join(overrides)}): {err}")
                continue
            except Exception as err:  # noqa: BLE001 - a composition error names the override
                first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
                errors.append(f"job #{num} ({' '.join(overrides)}): {first}")
                continue
            jobs.append({"num": num, "overrides": overrides, "dir": str(job_dir)})
    finally:
        hydra_config.cfg = saved
    if errors:
        raise SweepConfigError(errors, len(all_overrides))
    return jobs


class SweepConfigError(HDLError):
    def __init__(self, errors: list[str], total: int) -> None:
        self.errors = errors
        super().__init__(
            f"sweep not started: {len(errors)} of {total} jobs cannot run; " + errors[0]
        )


def job_status(job_dir: Path) -> dict[str, Any]:
    from hdl.failures import read_failure

    failure = read_failure(job_dir)
    if failure is not None:
        return {"status": "failed", **failure}
    if (job_dir / "metrics.json").is_file():
        return {"status": "ok"}
    return {"status": "no result"}


def summarise(config: DictConfig, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each job's outcome (``ok``, ``failed`` with its error, ``no result``)."""
    sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
    if not jobs:  # another sweeper: every job folder under the sweep dir
        jobs = [
            {"num": None, "overrides": [], "dir": str(p.parent)}
            for p in sorted(sweep_dir.glob("*/.hydra"))
        ]
    results = [job | job_status(Path(job["dir"])) for job in jobs]
    common = set.intersection(*(set(r["overrides"]) for r in results)) if results else set()
    for r in results:  # what tells the jobs apart
        r["varied"] = [o for o in r["overrides"] if o not in common]
    failed = [r for r in results if r["status"] != "ok"]
    return {
        "sweep_dir": str(sweep_dir),
        "jobs": len(results),
        "ok": len(results) - len(failed),
        "failed": len(failed),
        "results": results,
    }


def print_summary(summary: dict[str, Any]) -> None:
    out = sys.stderr if summary["failed"] else sys.stdout
    print(
        f"sweep: {summary['jobs']} jobs, {summary['ok']} ok, {summary['failed']} failed "
        f"({summary['sweep_dir']})",
        file=out,
    )
    for r in summary["results"]:
        if r["status"] == "ok":
            continue
        what = f"job #{r['num']}" if r["num"] is not None else Path(r["dir"]).name
        detail = (
            f"exit {r.get('exit_code')}: {r.get('error')} ({Path(r['dir']) / 'error.txt'})"
            if r["status"] == "failed"
            else f"no metrics.json and no error.txt in {r['dir']}"
        )
        print(f"  failed: {what} {' '.join(r['varied'])}: {detail}", file=out)


class HDLCallback(Callback):
    """Run identity before Hydra writes, sweep-wide checks, and the sweep summary."""

    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = _run_dir(config)
        if run_dir is None:
            return
        try:
            refuse_other_identity(run_dir, config)
        except HDLError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(EXIT_CONFIG)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global LAST_SUMMARY
        LAST_SUMMARY = None
        memoize_sweep_configs()
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
        from hdl.stacked_launcher import PLUGIN_NAME, start_workers

        if launcher == PLUGIN_NAME:  # workers import the training stack during the checks
            start_workers(OmegaConf.select(config, "hydra.launcher.n_jobs", default=None))
        try:
            self.jobs = check_jobs(config)
        except SweepConfigError as err:
            for line in err.errors:
                print(f"error: {line}", file=sys.stderr)
            print(
                f"error: sweep not started: {len(err.errors)} job(s) cannot run (no job ran)",
                file=sys.stderr,
            )
            sys.exit(EXIT_CONFIG)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global LAST_SUMMARY
        summary = summarise(config, self.jobs)
        LAST_SUMMARY = summary
        try:
            path = Path(summary["sweep_dir"]) / "sweep_summary.json"
            path.write_text(json.dumps(summary, indent=1))
        except OSError:
            pass
        print_summary(summary)
