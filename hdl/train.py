"""``hdl-train``: the Hydra entry point. Composes the config and runs one job
(:func:`hdl.runner.run`: validate, build, fit, test, write ``metrics.json``)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from hdl.build import config_dir
from hdl.errors import HDLError


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    try:
        from hdl.runner import run

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
