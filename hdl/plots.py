"""PNG plots of a comparison (matplotlib, headless): accuracy vs eps, sparsity per layer, spread
across splits, and a radar chart of the four holistic axes.

A leaf module: it draws what ``hdl.compare`` hands it (variants with ``label``, ``task``,
``stats``, ``runs`` and ``layers``; the axes and their normalised values) and imports nothing of
``hdl`` but the metric-key helpers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hdl.keys import attack_radii, metric_key

Variant = Any  # hdl.compare.Variant (not imported: plots stays a leaf)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _kind(variants: Sequence[Variant]) -> str:
    return "acc" if variants[0].task == "classification" else "rmse"


def accuracy_vs_eps(variants: Sequence[Variant], path: Path) -> Path:
    plt = _pyplot()
    kind = _kind(variants)
    fig, ax = plt.subplots(figsize=(6, 4))
    measured = attack_radii(k for v in variants for k in v.stats)
    for attack in sorted({a for a, _ in measured} - {"square"}):
        radii = sorted(e for a, e in measured if a == attack)
        for v in variants:
            keys = [f"test/{kind}"] + [metric_key("test", attack, kind, e) for e in radii]
            stats = [v.stats.get(k, (math.nan, math.nan)) for k in keys]
            ax.errorbar(
                [0.0, *radii],
                [m for m, _ in stats],
                yerr=[s for _, s in stats],
                marker="o",
                capsize=3,
                label=v.label if attack == "pgd" else f"{v.label} ({attack})",
            )
    ax.set_xlabel("ε (attack radius)")
    ax.set_ylabel("test accuracy" if kind == "acc" else "test RMSE")
    ax.set_title("Robustness: PGD accuracy vs ε (mean ± std over splits)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def sparsity_per_layer(variants: Sequence[Variant], path: Path) -> Path:
    plt = _pyplot()
    layers = list(dict.fromkeys(name for v in variants for name in v.layers))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(layers) + 2), 4))
    width = 0.8 / max(len(variants), 1)
    x = np.arange(len(layers))
    for i, v in enumerate(variants):
        ax.bar(x + i * width, [100 * v.layers.get(n, 0.0) for n in layers], width, label=v.label)
    ax.set_xticks(x + 0.4 - width / 2, layers, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("zero weights (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Sparsity per layer (mean over splits)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def spread_across_splits(variants: Sequence[Variant], path: Path) -> Path:
    plt = _pyplot()
    kind = _kind(variants)
    key = f"test/{kind}"
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(variants) + 2), 4))
    data = [[r.metrics.get(key, math.nan) for r in v.runs] for v in variants]
    ax.boxplot(data, showmeans=True)
    for i, values in enumerate(data, start=1):
        jitter = np.linspace(-0.08, 0.08, len(values)) if len(values) > 1 else [0.0]
        ax.scatter(i + np.asarray(jitter), values, s=14, alpha=0.7, zorder=3)
    ax.set_xticks(range(1, len(variants) + 1), [v.label for v in variants], rotation=20, ha="right")
    ax.set_ylabel("test accuracy" if kind == "acc" else "test RMSE")
    ax.set_title("Stability: test metric across train/validation splits")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def radar(
    points: Mapping[str, Mapping[str, float]],
    normalised: Mapping[str, Mapping[str, float]],
    axes: Sequence[str],
    path: Path,
) -> Path:
    """The axes per variant, outer is better. Classification axes are all in [0, 1] and are
    drawn as they are (differences are not exaggerated); otherwise the ``normalised`` values
    (each axis min-max scaled over the variants) are drawn."""
    AXES = tuple(axes)
    plt = _pyplot()
    values = [p.get(a, math.nan) for p in points.values() for a in AXES]
    raw = all(0.0 <= v <= 1.0 for v in values if math.isfinite(v))
    shown = points if raw else normalised
    angles = np.linspace(0, 2 * np.pi, len(AXES), endpoint=False).tolist()
    fig, ax = plt.subplots(figsize=(6, 5.5), subplot_kw={"polar": True})
    for label, p in shown.items():
        r = [0.0 if math.isnan(p.get(a, math.nan)) else p[a] for a in AXES]
        ax.plot(angles + angles[:1], r + r[:1], marker="o", label=label)
        ax.fill(angles + angles[:1], r + r[:1], alpha=0.06)
    ax.set_xticks(angles, list(AXES))
    ax.tick_params(axis="x", pad=14)
    ax.set_ylim(0, 1.0)
    scale = "1 = best" if raw else "scaled over variants, outer = best"
    ax.set_title(f"Holistic axes ({scale})", fontsize=10, pad=18)
    ax.legend(loc="upper right", bbox_to_anchor=(1.4, 1.1), fontsize=8)
    return _save(fig, path)


def write_plots(
    variants: Sequence[Variant],
    points: Mapping[str, Mapping[str, float]],
    normalised: Mapping[str, Mapping[str, float]],
    axes: Sequence[str],
    out: Path,
) -> list[Path]:
    return [
        accuracy_vs_eps(variants, out / "accuracy_vs_eps.png"),
        sparsity_per_layer(variants, out / "sparsity_per_layer.png"),
        spread_across_splits(variants, out / "spread_across_splits.png"),
        radar(points, normalised, axes, out / "axes_radar.png"),
    ]
