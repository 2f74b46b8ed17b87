"""``hdl-train``: the Hydra entry point. Composes the config and runs one job
(:func:`hdl.runner.run`: validate, build, fit, test, write ``metrics.json``).

Exit codes (docs/runs.md): 0 done; 2 a configuration or data error, or a run identity mismatch
(one line); 3 a NaN / infinite loss or metric stopped the run; 4 a sweep ran and some of its
jobs failed; 143 stopped by SIGTERM (relaunch to resume); 1 an unexpected error (traceback).
A failed run leaves ``error.txt`` in its folder, never a ``metrics.json``.
"""

from __future__ import annotations

import math
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

from hdl.config import config_dir
from hdl.errors import EXIT_ERROR, EXIT_SIGTERM, EXIT_SWEEP_FAILED, HDLError


def _failed(cfg: DictConfig, multirun: bool, code: int, run_dir: Path) -> float | None:
    """A failed job: the sweep goes on (``on_failure: continue``) or the process exits."""
    if multirun and cfg.get("on_failure", "continue") == "continue":
        print(f"job failed (exit {code}), the sweep goes on: {run_dir}/error.txt", file=sys.stderr)
        # an optimizing sweeper (Optuna) records a NaN objective as a failed trial
        return math.nan if cfg.get("optimized_metric") else None
    sys.exit(code)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from hdl.config import check_light
    from hdl.console import print_config_tree, quiet
    from hdl.failures import record_failure

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    quiet(cfg.get("verbose") is True)
    try:
        check_light(cfg)  # before torch and Lightning are imported: a wrong key fails fast
        if cfg.get("print_config"):
            print_config_tree(cfg)
        from hdl.runner import run

        metrics = run(cfg, run_dir)
    except HDLError as err:
        if not getattr(err, "recorded", False):
            record_failure(run_dir, str(err), err.exit_code)
        print(f"error: {err}", file=sys.stderr)
        return _failed(cfg, multirun, err.exit_code, run_dir)
    except SystemExit as err:
        if type(err).__name__ != "SIGTERMException":
            raise
        # stopped (preemption, scancel, SLURM time limit): relaunch with the same run_id resumes
        print(f"stopped by SIGTERM; resume with the same overrides: {run_dir}", file=sys.stderr)
        sys.exit(EXIT_SIGTERM)
    except Exception as err:  # a bug, not a user error: keep the traceback
        trace = traceback.format_exc()
        if not getattr(err, "recorded", False):
            record_failure(run_dir, f"{type(err).__name__}: {err}", EXIT_ERROR, trace)
        if not (multirun and cfg.get("on_failure", "continue") == "continue"):
            raise
        print(trace, file=sys.stderr)
        return _failed(cfg, multirun, EXIT_ERROR, run_dir)
    objective = cfg.get("optimized_metric")
    return metrics["metrics"].get(objective) if objective else None


def main() -> None:
    from hdl.stacked_launcher import register

    register()  # hydra/launcher=stacked
    _hydra_main()
    from hdl import sweep

    if sweep.LAST_SUMMARY and sweep.LAST_SUMMARY["failed"]:
        sys.exit(EXIT_SWEEP_FAILED)


if __name__ == "__main__":
    main()
