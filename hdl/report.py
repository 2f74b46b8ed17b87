"""What a run leaves on disk: ``metrics.json`` (final metrics, resolved config, versions),
``predictions.npz`` (test logits and targets, for stability across splits), and the table
printed at the end of ``hdl-train``."""

from __future__ import annotations

import json
import math
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

PACKAGES = (
    "hdl",
    "torch",
    "pytorch-lightning",
    "hydra-core",
    "torchattacks",
    "wandb",
    "torchmetrics",
)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def collect_metrics(
    cfg: DictConfig, trainer, module, data, run_dir: Path, fit_metrics: dict
) -> dict[str, Any]:
    from hdl.callbacks import EpochTimer

    metrics: dict[str, float] = {}
    for key, value in fit_metrics.items():
        if key.startswith(("train/", "val/", "time/", "sparsity/")) and _number(value) is not None:
            metrics[key] = _number(value)
    metrics.update(module.test_results)
    timer = next((c for c in trainer.callbacks if isinstance(c, EpochTimer)), None)
    if timer is not None:
        metrics["time/epoch_s"] = timer.seconds_per_epoch
        metrics["time/step_ms"] = timer.ms_per_step
    from hdl.sparsity import parameter_counts, zero_fractions

    sparsity = zero_fractions(module.net)
    metrics["sparsity/zero_fraction"] = sparsity.get("total", 0.0)
    # the network's real parameters (not the mask logits, nor the raw weights behind the masks)
    total, nonzero = parameter_counts(module.net)
    metrics["params/total"] = float(total)
    metrics["params/nonzero"] = float(nonzero)
    resolved = OmegaConf.to_container(cfg, resolve=True)  # once, not once per key
    config = {k: v for k, v in resolved.items() if k != "hydra"}
    return {
        "name": cfg.name,
        "loss": cfg.loss.get("name"),
        "data": cfg.data.get("name"),
        "model": cfg.model.get("name"),
        "task": data.task,
        "seed": int(cfg.seed),
        "data_seed": int(cfg.data.get("seed", 0)),
        "split_seed": int(cfg.data.get("split_seed", 0)),
        "run_dir": str(run_dir),
        "epochs": int(trainer.current_epoch),
        "global_step": int(trainer.global_step),
        "metrics": metrics,
        "sparsity": sparsity,
        "config": config,
        "versions": versions(),
    }


def write_run_files(run_dir: Path, metrics: dict[str, Any], module) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    if module.test_logits:
        logits = torch.cat(module.test_logits).float().numpy()
        targets = torch.cat(module.test_targets).numpy()
        np.savez_compressed(
            run_dir / "predictions.npz", logits=logits.astype(np.float32), targets=targets
        )
    # the model that was evaluated (chosen on validation): what hdl-eval and export read
    torch.save(
        {"state_dict": module.state_dict(), "selected": metrics.get("selected")},
        run_dir / "selected.ckpt",
    )
    from hdl.sparsity import effective_weights

    # the effective (masked) weights: stability across splits compares them
    weights = {k: t.cpu().float().numpy() for k, t in effective_weights(module.net).items()}
    np.savez_compressed(run_dir / "weights.npz", **weights)


def print_metrics(metrics: dict[str, Any], run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{metrics['name']} · loss={metrics['loss']}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    shown = [
        k
        for k in metrics["metrics"]
        if k.startswith(("test/", "val/", "sparsity/zero", "time/"))
        or k in ("train/theta", "train/l0", "train/robust", "train/stable")
    ]
    for key in shown:
        table.add_row(key, f"{metrics['metrics'][key]:.4g}")
    console = Console()
    console.print(table)
    chosen = metrics.get("selected") or {}
    if metrics.get("eval_only"):
        console.print(
            f"evaluated: the checkpoint {metrics.get('checkpoint')} (eval only, no training)"
        )
    elif chosen.get("step") is not None:
        console.print(
            f"evaluated: the model of step {chosen['step']} (best {chosen['monitor']} on "
            "validation"
            + (", final sparsity round" if metrics["metrics"].get("sparsity/zero_fraction") else "")
            + ")"
        )
    for flag in metrics.get("flags", []):
        console.print(f"[bold red]⚠ {flag}[/]")
    console.print(f"run files: {run_dir}")
