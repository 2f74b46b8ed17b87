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


LONG_LABEL = 28  # longer variant names are numbered in the plots, with a key under the figure


def short_labels(labels: Sequence[str]) -> tuple[list[str], str | None]:
    """Legend names and the key that explains them: the labels themselves when short, else
    ``[1]``, ``[2]``, ... and a key ``[1] <label>`` per line."""
    labels = list(labels)
    if all(len(label) <= LONG_LABEL for label in labels):
        return labels, None
    names = [f"[{i}]" for i in range(1, len(labels) + 1)]
    return names, "\n".join(f"{n} {label}" for n, label in zip(names, labels, strict=True))


def _legend(fig, ax, key: str | None, fontsize: int = 8) -> None:
    """The legend outside the axes (right), and the key of numbered names under the figure."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    if key:
        fig.text(0.01, -0.02, key, ha="left", va="top", fontsize=7, family="monospace")


def accuracy_vs_eps(variants: Sequence[Variant], path: Path) -> Path:
    plt = _pyplot()
    kind = _kind(variants)
    fig, ax = plt.subplots(figsize=(6, 4))
    measured = attack_radii(k for v in variants for k in v.stats)
    names, key = short_labels([v.label for v in variants])
    for attack in sorted({a for a, _ in measured} - {"square"}):
        radii = sorted(e for a, e in measured if a == attack)
        for name, v in zip(names, variants, strict=True):
            keys = [f"test/{kind}"] + [metric_key("test", attack, kind, e) for e in radii]
            stats = [v.stats.get(k, (math.nan, math.nan)) for k in keys]
            ax.errorbar(
                [0.0, *radii],
                [m for m, _ in stats],
                yerr=[s for _, s in stats],
                marker="o",
                capsize=3,
                label=name if attack == "pgd" else f"{name} ({attack})",
            )
    ax.set_xlabel("ε (attack radius)")
    ax.set_ylabel("test accuracy" if kind == "acc" else "test RMSE")
    ax.set_title("Robustness: PGD accuracy vs ε (mean ± std over splits)")
    ax.grid(alpha=0.3)
    _legend(fig, ax, key)
    return _save(fig, path)


def sparsity_per_layer(variants: Sequence[Variant], path: Path) -> Path:
    plt = _pyplot()
    layers = list(dict.fromkeys(name for v in variants for name in v.layers))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(layers) + 2), 4))
    width = 0.8 / max(len(variants), 1)
    x = np.arange(len(layers))
    names, key = short_labels([v.label for v in variants])
    for i, (name, v) in enumerate(zip(names, variants, strict=True)):
        ax.bar(x + i * width, [100 * v.layers.get(n, 0.0) for n in layers], width, label=name)
    ax.set_xticks(x + 0.4 - width / 2, layers, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("zero weights (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Sparsity per layer (mean over splits)")
    values = [v.layers.get(n, 0.0) for v in variants for n in layers]
    if not layers:  # bars of height 0 draw nothing: say why the plot is empty
        note = "no per-layer sparsity recorded in these runs"
    elif not any(values):
        note = "no zero weights: every layer of every variant is 0 % sparse"
    else:
        note = None
    if note:
        ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", fontsize=10)
    _legend(fig, ax, key)
    return _save(fig, path)


def spread_across_splits(variants: Sequence[Variant], path: Path) -> Path:
    plt = _pyplot()
    kind = _kind(variants)
    key = f"test/{kind}"
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(variants) + 2), 4))
    data = [
        [x for x in (r.metrics.get(key, math.nan) for r in v.runs) if math.isfinite(x)]
        for v in variants
    ]  # a missing value is not drawn
    ax.boxplot(data, showmeans=True)
    for i, values in enumerate(data, start=1):
        jitter = np.linspace(-0.08, 0.08, len(values)) if len(values) > 1 else [0.0]
        if values:
            ax.scatter(i + np.asarray(jitter), values, s=14, alpha=0.7, zorder=3)
    names, legend_key = short_labels([v.label for v in variants])
    ax.set_xticks(range(1, len(variants) + 1), names, rotation=20, ha="right")
    if legend_key:
        fig.text(0.01, -0.02, legend_key, ha="left", va="top", fontsize=7, family="monospace")
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
    names, key = short_labels(list(shown))
    missing: dict[str, list[str]] = {}
    for name, p in zip(names, shown.values(), strict=True):
        # a missing axis is a gap in the outline (NaN is not drawn), never a point at 0
        r = [p.get(a, math.nan) for a in AXES]
        r = [x if math.isfinite(x) else math.nan for x in r]
        ax.plot(angles + angles[:1], r + r[:1], marker="o", label=name)
        if all(math.isfinite(x) for x in r):
            ax.fill(angles + angles[:1], r + r[:1], alpha=0.06)
        for a, x in zip(AXES, r, strict=True):
            if not math.isfinite(x):
                missing.setdefault(a, []).append(name)
    ax.set_xticks(
        angles, [f"{a}\n(n/a: {', '.join(missing[a])})" if a in missing else a for a in AXES]
    )
    ax.tick_params(axis="x", pad=14)
    ax.set_ylim(0, 1.0)
    scale = "1 = best" if raw else "scaled over variants, outer = best"
    ax.set_title(f"Holistic axes ({scale})", fontsize=10, pad=18)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.15, 1.1), fontsize=8, borderaxespad=0)
    if key:
        fig.text(0.01, -0.02, key, ha="left", va="top", fontsize=7, family="monospace")
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
