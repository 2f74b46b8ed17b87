"""Loading a finished (or stopped) run from disk: its directory, checkpoint, config, data split
exactly as in training, and the module with the checkpoint's weights. Used by ``hdl-eval``
and the other commands that work on a run after training."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from hdl.errors import DataError


@dataclass
class LoadedRun:
    run_dir: Path
    checkpoint: Path
    cfg: DictConfig
    data: Any  # the run's data module, arrays loaded and split exactly as in training
    module: Any  # HolisticModule with the checkpoint's weights, in eval mode


def find_run(path: str | Path) -> tuple[Path, Path]:
    """(run dir, checkpoint) from a run dir or a ``.ckpt``. A run dir gives the model that the
    run evaluated, ``selected.ckpt`` (chosen on validation), else ``checkpoints/last.ckpt`` (a
    run stopped before it finished)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".ckpt":
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return run_dir, path
    if path.is_dir():
        for ckpt in (path / "selected.ckpt", path / "checkpoints" / "last.ckpt"):
            if ckpt.is_file():
                return path, ckpt
        raise DataError(f"{path}: neither selected.ckpt nor checkpoints/last.ckpt in this run")
    raise DataError(f"{path}: not a run directory or a .ckpt file")


def run_config(run_dir: Path) -> DictConfig:
    """The run's config: the resolved copy in ``metrics.json`` (written at the end of a run),
    else ``.hydra/config.yaml`` (a run stopped before it finished), with its ``${hydra:...}``
    interpolations pointed at ``run_dir``."""
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        return OmegaConf.create(json.loads(metrics.read_text())["config"])
    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    if hydra_cfg.is_file():
        from hydra.core.utils import setup_globals

        setup_globals()  # the ${now:...} resolver
        text = hydra_cfg.read_text().replace("${hydra:runtime.output_dir}", str(run_dir))
        return OmegaConf.create(text)
    raise DataError(
        f"{run_dir}: neither metrics.json nor .hydra/config.yaml holds the run's config"
    )


def read_checkpoint(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's content, or a one-line DataError when it is corrupt, cut short or not a
    checkpoint of hdl-train (``selected.ckpt`` or a Lightning checkpoint)."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any failure: not a readable checkpoint
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{ckpt}: not a readable checkpoint ({reason})") from None
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise DataError(f"{ckpt}: holds no model weights (state_dict): not an hdl-train checkpoint")
    return state


def load_run(path: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild a run's data and model from its saved config and load its checkpoint."""
    from hdl.build import build

    run_dir, ckpt = find_run(path)
    cfg = run_config(run_dir)
    state = read_checkpoint(ckpt)
    data, module = build(cfg)
    try:
        module.load_state_dict(state["state_dict"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0] if first else type(err).__name__
        raise DataError(
            f"{ckpt}: does not fit the run's configuration ({detail}): a checkpoint of another run?"
        ) from None
    module.to(device).eval()
    return LoadedRun(run_dir, ckpt, cfg, data, module)
