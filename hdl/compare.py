"""``hdl-compare``: many runs -> one baseline-vs-holistic comparison (tables and plots).

Runs are read from disk alone (``metrics.json``, ``predictions.npz``, ``weights.npz`` and, when
``hdl-eval`` ran, ``eval.json``). Runs that differ only in ``data.split_seed`` or ``seed`` form a
group (a *variant*); each variant gets mean ± std over all its runs of natural accuracy, accuracy
under attack per eps, zero-weight fraction and training time, and the stability metrics of
:mod:`hdl.stability`, kept apart by what varies:

- *split* stability (keys ``split/...``, "stability over splits"): among runs with the same
  ``seed`` and different ``data.split_seed``;
- *init-seed* stability (keys ``seed/...``, "stability over init seeds"): among runs with the
  same ``data.split_seed`` and different ``seed``.

Each is computed in every such subgroup of at least two runs and averaged over the subgroups,
weighted by their run counts (a variant that varies only the split seed has one subgroup, so its
split stability is that of all its runs). A variant whose runs vary in neither, or in which no
two runs share a seed or a split, has no stability. Written: ``comparison.md`` (the table and a
legend of its stability columns), ``comparison.csv``, ``comparison.json`` and PNG plots.

Four axes judge a variant (higher is better, each in [0, 1] for classification): accuracy,
robustness (accuracy under the strongest attack at the largest eps), sparsity (fraction of zero
weights) and stability (1 - mean Gini impurity of the predicted labels across splits, or across
init seeds where no split stability was measured; :func:`stability_source` says which).
``--prefer`` weights them and names the Pareto-optimal variant that fits best.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hdl.errors import ConfigError, DataError, HDLError
from hdl.keys import attack_radii, format_eps, metric_key, parse_metric_key
from hdl.stability import load_predictions, prediction_stability, weight_stability

AXES = ("accuracy", "robustness", "sparsity", "stability")
SPLIT_KEY, SEED_KEY = "data.split_seed", "seed"
# kind of stability -> (what it is over, the key its runs share, the key they vary); the axis
# takes the first kind a variant has
STABILITY_KINDS = {
    "split": ("splits", SEED_KEY, SPLIT_KEY),
    "seed": ("init seeds", SPLIT_KEY, SEED_KEY),
}
# config keys that never define a variant: what a stability group varies, and run bookkeeping
IGNORED_KEYS = (
    SEED_KEY,
    SPLIT_KEY,
    "ckpt_path",
    "print_metrics",
    "print_config",
    "verbose",
    "on_failure",
    "tags",
    "test",
    "run_id",
)
# a smoke run (Lightning's fast_dev_run / overfit_batches, or fewer optimizer steps than this)
# measures nothing: hdl-compare lists it apart and never ranks it
SMOKE_STEPS = 10
IGNORED_PREFIXES = ("logger.", "callbacks.", "hydra.")


# --- reading runs ------------------------------------------------------------------------------
@dataclass
class Run:
    path: Path
    meta: dict[str, Any]
    metrics: dict[str, float]
    config: dict[str, Any]  # flattened, dotted keys
    warnings: list[str] = field(default_factory=list)

    @property
    def task(self) -> str:
        return self.meta.get("task", "classification")

    @property
    def smoke(self) -> str | None:
        """Why this is a smoke run (None if it is not): ``trainer.fast_dev_run`` or
        ``trainer.overfit_batches`` set, or fewer than :data:`SMOKE_STEPS` optimizer steps."""
        for key in ("trainer.fast_dev_run", "trainer.overfit_batches"):
            value = self.config.get(key)
            if value not in (None, False, 0, 0.0):
                return f"{key}={value}"
        steps = self.meta.get("global_step")
        if isinstance(steps, int | float) and steps < SMOKE_STEPS:
            return f"{int(steps)} optimizer steps (< {SMOKE_STEPS})"
        return None

    @property
    def non_finite(self) -> list[str]:
        """Result metrics (test, validation, hdl-eval) that are NaN, infinite or missing values."""
        raw = self.meta.get("metrics", {})
        keys = [k for k in raw if k.startswith(("test/", "val/"))] + [
            k for k in self.metrics if k.startswith("eval/")
        ]
        return [
            k
            for k in keys
            if not isinstance(self.metrics.get(k), float) or not math.isfinite(self.metrics[k])
        ]


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: json.dumps(node) if isinstance(node, list) else node}


def _eval_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """``eval.json`` robustness numbers as ``eval/<attack>_<kind>@<eps>`` metrics."""
    kind = "acc" if report.get("task", "classification") == "classification" else "rmse"
    key = "accuracy" if kind == "acc" else "rmse"
    out = {}
    for attack, by_eps in report.get("robustness", {}).items():
        for eps, values in by_eps.items():
            if float(eps) > 0:
                value = values.get(key)
                out[metric_key("eval", attack, kind, float(eps))] = (
                    math.nan if value is None else float(value)
                )
    return out


def load_run(run_dir: Path) -> Run:
    meta = json.loads((run_dir / "metrics.json").read_text())
    metrics = {k: float(v) for k, v in meta.get("metrics", {}).items() if v is not None}
    warnings: list[str] = []
    eval_file = run_dir / "eval.json"
    if eval_file.is_file():
        report = json.loads(eval_file.read_text())
        metrics |= _eval_metrics(report)
        warnings += report.get("warnings", [])
    verify_file = run_dir / "verify.json"
    if verify_file.is_file():  # hdl-verify: certified accuracy as eval/ibp_acc@eps, crown_acc
        report = json.loads(verify_file.read_text())
        metrics |= {
            k: float(v)
            for k, v in report.get("metrics", {}).items()
            if (p := parse_metric_key(k)) and p.attack in ("ibp", "crown")  # hdl.bounds
        }
        warnings += report.get("warnings", [])
    run_path = str(run_dir)
    config = {
        k: v
        for k, v in flatten(meta.get("config", {})).items()
        if not (isinstance(v, str) and (run_path in v or meta.get("run_dir", "\0") in v))
    }
    return Run(run_dir, meta, metrics, config, warnings)


def discover(paths: Iterable[str | Path]) -> list[Run]:
    """Every run (a directory holding ``metrics.json``) at or below the given paths."""
    found: dict[Path, Run] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path}: no such file or directory")
        files = [path] if path.name == "metrics.json" else sorted(path.rglob("metrics.json"))
        for file in files:
            found.setdefault(file.parent.resolve(), load_run(file.parent))
    if not found:
        raise DataError(f"no runs (metrics.json files) found under {', '.join(map(str, paths))}")
    return list(found.values())


# --- grouping ----------------------------------------------------------------------------------
def _defines_variant(key: str) -> bool:
    return key not in IGNORED_KEYS and not key.startswith(IGNORED_PREFIXES)


def _order(value: Any) -> tuple:
    """Sort key for config values that may be missing (None) or of mixed types."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, str(value))


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Variants: runs that agree on every config key except the split/seed keys (sorted by split
    seed, then seed). Each variant is labelled by its loss preset plus the keys in which the
    variants differ."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        key = tuple(sorted((k, repr(v)) for k, v in run.config.items() if _defines_variant(k)))
        groups.setdefault(key, []).append(run)
    keys = list(groups)

    def differing(among: list[tuple]) -> set[str]:
        return {k for key in among for k, _ in key if len({dict(g).get(k) for g in among}) > 1}

    def loss_name(key: tuple) -> str:
        return str(dict(key).get("loss.name", "'run'")).strip("'")

    # loss.* keys that a preset implies are not listed; only those that differ within a preset
    outside_loss = {k for k in differing(keys) if not k.startswith("loss.")}
    labelled: dict[str, list[Run]] = {}
    for key in keys:
        first = groups[key][0]
        same_loss = [g for g in keys if loss_name(g) == loss_name(key)]
        shown = sorted(outside_loss | {k for k in differing(same_loss) if k.startswith("loss.")})
        parts = [loss_name(key)]
        parts += [f"{k}={first.config.get(k)}" for k in shown if k in first.config]
        label = " ".join(parts)
        while label in labelled:  # identical labels only if a differing key is missing somewhere
            label += "'"
        labelled[label] = sorted(
            groups[key],
            key=lambda r: (_order(r.config.get(SPLIT_KEY, 0)), _order(r.config.get(SEED_KEY, 0))),
        )
    return labelled


# --- aggregation -------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


@dataclass
class Variant:
    label: str
    runs: list[Run]
    stats: dict[str, tuple[float, float]]  # metric -> (mean, std) over runs
    stability: dict[str, float]  # "<kind>/<metric>", kind in STABILITY_KINDS
    layers: dict[str, float]  # mean zero fraction per layer
    warnings: list[str]
    # what keeps it out of the Pareto front and the recommendation (empty: ranked)
    excluded: list[str] = field(default_factory=list)

    @property
    def task(self) -> str:
        return self.runs[0].task

    def mean(self, key: str) -> float:
        return self.stats.get(key, (math.nan, math.nan))[0]

    @property
    def stability_kinds(self) -> list[str]:
        """The kinds of stability measured (``split``, ``seed``), in STABILITY_KINDS order."""
        return [k for k in STABILITY_KINDS if any(s.startswith(f"{k}/") for s in self.stability)]

    def stability_of(self, kind: str) -> dict[str, float]:
        """One kind's metrics, without the ``<kind>/`` prefix ({} when not measured)."""
        prefix = f"{kind}/"
        return {k[len(prefix) :]: x for k, x in self.stability.items() if k.startswith(prefix)}


def adversarial_keys(variants: Iterable[Variant], prefix: str = "test/") -> list[tuple[str, float]]:
    """(attack, eps) pairs measured under ``prefix`` (``test/``: the test loop; ``eval/``:
    ``hdl-eval``), sorted by attack then eps."""
    return attack_radii((k for v in variants for k in v.stats), prefix.rstrip("/"))


def _gradient_masking(stats: Mapping[str, tuple[float, float]], kind: str, n: int) -> list[str]:
    """Square (gradient-free) beating PGD at the same eps: PGD overstates robustness."""
    out = []
    for key, (square, _) in stats.items():
        parsed = parse_metric_key(key)
        if not parsed or parsed.split != "test" or parsed.attack != "square" or parsed.kind != kind:
            continue
        pgd = stats.get(metric_key("test", "pgd", kind, parsed.eps), (math.nan,))[0]
        if math.isfinite(pgd) and square < pgd - 1.0 / max(n, 1):
            out.append(
                f"gradient masking: Square ({square:.3f}) beats PGD ({pgd:.3f}) at "
                f"eps={format_eps(parsed.eps)}"
            )
    return out


def stability_subgroups(runs: Sequence[Run], kind: str) -> tuple[list[list[Run]], int]:
    """The runs a kind of stability compares: runs sharing the kind's fixed key (e.g. ``seed`` for
    split stability), one run per value of its varied key, in subgroups of at least 2 runs. Also
    returns how many runs were left out as repeats of the same (fixed, varied) pair."""
    _, fixed, varied = STABILITY_KINDS[kind]
    by_fixed: dict[str, dict[str, Run]] = {}
    repeats = 0
    for run in runs:
        subgroup = by_fixed.setdefault(repr(run.config.get(fixed)), {})
        value = repr(run.config.get(varied))
        if value in subgroup:
            repeats += 1
        else:
            subgroup[value] = run
    return [list(g.values()) for g in by_fixed.values() if len(g) > 1], repeats


def _load_weights(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _weighted_mean(results: Sequence[tuple[int, Mapping[str, float]]]) -> dict[str, float]:
    """Each metric averaged over the subgroups that have it, weighted by their run counts
    (exactly the subgroup's value when there is one)."""
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for _, r in results for k in r):
        have = [(n, r[key]) for n, r in results if key in r]
        total = sum(n for n, _ in have)
        out[key] = float(sum(x * (n / total) for n, x in have))
    return out


def measure_stability(runs: Sequence[Run], task: str) -> tuple[dict[str, float], list[str]]:
    """``split/<metric>`` and ``seed/<metric>`` (see :mod:`hdl.stability`; plus ``runs``: the runs
    compared, ``groups``: the subgroups averaged) of one variant's runs, and warnings."""
    warnings: list[str] = []
    usable = [r for r in runs if (r.path / "predictions.npz").is_file()]
    if len(usable) < len(runs) and usable:
        warnings.append(
            f"{len(runs) - len(usable)} of {len(runs)} runs have no predictions.npz: "
            "left out of the stability metrics"
        )
    if len(usable) < 2:
        return {}, warnings
    weights: dict[Path, dict[str, np.ndarray]] = {}  # loaded once, shared by both kinds
    stability: dict[str, float] = {}
    any_subgroup = False
    for kind, (over, _, varied) in STABILITY_KINDS.items():
        subgroups, repeats = stability_subgroups(usable, kind)
        if repeats and subgroups:
            warnings.append(
                f"stability over {over}: {repeats} run(s) repeat another run's {varied} "
                "and were left out"
            )
        any_subgroup = any_subgroup or bool(subgroups)
        results: list[tuple[int, dict[str, float]]] = []
        for group in subgroups:
            try:
                logits, targets = load_predictions([r.path / "predictions.npz" for r in group])
                result = prediction_stability(logits, targets, task)
            except ValueError as err:
                warnings.append(f"stability over {over} not measured: {err}")
                continue
            if all((r.path / "weights.npz").is_file() for r in group):
                for r in group:
                    if r.path not in weights:
                        weights[r.path] = _load_weights(r.path / "weights.npz")
                result |= weight_stability([weights[r.path] for r in group]) or {}
            result.pop("runs", None)
            results.append((len(group), result))
        if results:
            averaged = _weighted_mean(results)
            averaged |= {"runs": float(sum(n for n, _ in results)), "groups": float(len(results))}
            stability |= {f"{kind}/{k}": x for k, x in averaged.items()}
    varies = {
        key: len({repr(r.config.get(key)) for r in usable}) > 1 for key in (SPLIT_KEY, SEED_KEY)
    }
    if any(varies.values()) and not any_subgroup:
        warnings.append(
            "stability not measured: no two runs share a seed or a data.split_seed"
            " (split and init-seed stability are not pooled)"
        )
    return stability, warnings


def aggregate(label: str, runs: list[Run]) -> Variant:
    keys = sorted({k for r in runs for k in r.metrics})
    stats = {k: mean_std([r.metrics.get(k, math.nan) for r in runs]) for k in keys}
    task = runs[0].task
    # a run's own flags (collapse on validation or test) and the sanity-check warnings of
    # hdl-eval / hdl-verify flag its variant: listed, and never ranked
    flags = sorted({w for r in runs for w in [*r.warnings, *r.meta.get("flags", [])]})
    warnings = list(flags)
    stability, found = measure_stability(runs, task)
    warnings += found
    layers: dict[str, list[float]] = {}
    for r in runs:
        for name, frac in r.meta.get("sparsity", {}).items():
            if name != "total":
                layers.setdefault(name, []).append(float(frac))
    n_test = 0
    preds = [r.path / "predictions.npz" for r in runs if (r.path / "predictions.npz").is_file()]
    if preds:
        with np.load(preds[0]) as f:
            n_test = len(f["targets"])
    kind = "acc" if task == "classification" else "rmse"
    masking = _gradient_masking(stats, kind, n_test)
    warnings += masking
    return Variant(
        label,
        runs,
        stats,
        stability,
        {k: float(np.mean(v)) for k, v in layers.items()},
        warnings,
        exclusion_reasons(runs, flags + masking),
    )


def exclusion_reasons(runs: Sequence[Run], flags: Sequence[str]) -> list[str]:
    """Why a variant is not ranked: smoke runs, non-finite metrics, or flags (gradient masking,
    collapse, failed sanity checks). A variant is ranked only when this is empty."""
    reasons = []
    smoke = [r for r in runs if r.smoke]
    if smoke:
        what = (
            "smoke runs only"
            if len(smoke) == len(runs)
            else f"{len(smoke)} of {len(runs)} runs are smoke runs"
        )
        reasons.append(f"{what} ({smoke[0].smoke})")
    broken = [r for r in runs if r.non_finite]
    if broken:
        reasons.append(
            f"non-finite metrics in {len(broken)} of {len(runs)} runs ({', '.join(broken[0].non_finite[:3])})"
        )
    reasons += [f"flagged: {f}" for f in flags]
    return reasons


def compare(runs: Sequence[Run]) -> list[Variant]:
    variants = [aggregate(label, rs) for label, rs in group_runs(runs).items()]
    order = {"baseline": 0, "robust": 1, "stable": 2, "sparse": 3, "holistic": 4}
    return sorted(variants, key=lambda v: (order.get(v.label.split()[0], 5), v.label))


# --- the four axes, Pareto front and preferences ---------------------------------------------
def _over(kind: str | None) -> str:
    """``splits`` / ``init seeds`` for a kind of stability ("" for None)."""
    return STABILITY_KINDS[kind][0] if kind else ""


def stability_source(v: Variant) -> str | None:
    """The kind of stability the stability axis uses: ``split`` when measured, else ``seed``."""
    return v.stability_kinds[0] if v.stability_kinds else None


def axes(v: Variant) -> dict[str, float]:
    """The variant's position on the four holistic axes (higher is better). Stability is over
    splits where measured, else over init seeds (:func:`stability_source`)."""
    measured = adversarial_keys([v])
    largest = max((e for _, e in measured), default=None)
    source = stability_source(v)
    st = v.stability_of(source) if source else {}
    if v.task == "classification":
        accuracy = v.mean("test/acc")
        # the strongest attack at the largest radius: the minimum accuracy over attacks
        at_largest = [v.mean(metric_key("test", a, "acc", e)) for a, e in measured if e == largest]
        robust = min((x for x in at_largest if math.isfinite(x)), default=math.nan)
        stability = 1.0 - st["gini"] if "gini" in st else math.nan
    else:  # regression: negative errors, so that higher is still better
        accuracy = -v.mean("test/rmse")
        at_largest = [v.mean(metric_key("test", a, "rmse", e)) for a, e in measured if e == largest]
        robust = -max((x for x in at_largest if math.isfinite(x)), default=math.nan)
        stability = -st.get("prediction_std", math.nan)
    return {
        "accuracy": accuracy,
        "robustness": robust,
        "sparsity": v.mean("sparsity/zero_fraction"),
        "stability": stability,
    }


def pareto_front(points: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Labels not dominated on the axes they all have (NaN axes are left out)."""
    usable = [a for a in AXES if all(math.isfinite(p.get(a, math.nan)) for p in points.values())]
    front = []
    for label, p in points.items():
        dominated = any(
            all(q[a] >= p[a] for a in usable) and any(q[a] > p[a] for a in usable)
            for other, q in points.items()
            if other != label
        )
        if not dominated:
            front.append(label)
    return front


def parse_preferences(text: str | None) -> dict[str, float]:
    """``robustness=2,sparsity=1`` -> weights; axes not named get 0 (all 1 when text is None)."""
    if not text:
        return dict.fromkeys(AXES, 1.0)
    weights = dict.fromkeys(AXES, 0.0)
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in AXES:
            raise ConfigError(f"--prefer: unknown axis {name!r} (axes: {', '.join(AXES)})")
        try:
            weights[name] = float(value) if value.strip() else 1.0
        except ValueError:
            raise ConfigError(f"--prefer: {item!r} needs a number, e.g. {name}=2") from None
        if weights[name] < 0:
            raise ConfigError(f"--prefer: weight of {name} must be >= 0, got {weights[name]}")
    if not any(weights.values()):
        raise ConfigError("--prefer: at least one axis needs a positive weight")
    return weights


def normalise_axes(points: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Each axis min-max scaled to [0, 1] over the variants (1 where all are equal; NaN stays)."""
    out: dict[str, dict[str, float]] = {label: {} for label in points}
    for a in AXES:
        finite = [p[a] for p in points.values() if math.isfinite(p.get(a, math.nan))]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
        for label, p in points.items():
            x = p.get(a, math.nan)
            out[label][a] = x if not math.isfinite(x) else 1.0 if hi == lo else (x - lo) / (hi - lo)
    return out


def recommend(
    points: Mapping[str, Mapping[str, float]], weights: Mapping[str, float]
) -> list[tuple[str, float]]:
    """Pareto-optimal variants ranked by the weighted sum of their min-max normalised axes
    (an axis no variant has counts 0)."""
    normalised = normalise_axes(points)
    total = sum(weights.values())

    def score(label: str) -> float:
        values = normalised[label]
        return sum(w * values[a] for a, w in weights.items() if math.isfinite(values[a])) / total

    scores = [(label, score(label)) for label in pareto_front(points)]
    return sorted(scores, key=lambda s: -s[1])


# --- tables ------------------------------------------------------------------------------------
def _fmt(mean: float, std: float, percent: bool = False) -> str:
    if not math.isfinite(mean):
        return "–"
    if percent:
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    return f"{mean:.3f} ± {std:.3f}" if math.isfinite(std) else f"{mean:.3f}"


# the stability columns: (header, key in hdl.stability, format); "min acc %" is in percent
STABILITY_COLUMNS = {
    "classification": [
        ("min acc %", "acc_min", "{:.1f}", 100.0),
        ("label gini", "gini", "{:.4f}", 1.0),
        ("logit std", "logit_std", "{:.4f}", 1.0),
        ("prob std", "prob_std", "{:.4f}", 1.0),
        ("weight std", "weight_std", "{:.4f}", 1.0),
        ("weight CV", "weight_cv", "{:.4f}", 1.0),
    ],
    "regression": [
        ("max RMSE", "rmse_max", "{:.4f}", 1.0),
        ("pred std", "prediction_std", "{:.4f}", 1.0),
        ("pred std / target std", "prediction_std_rel", "{:.4f}", 1.0),
        ("weight std", "weight_std", "{:.4f}", 1.0),
        ("weight CV", "weight_cv", "{:.4f}", 1.0),
    ],
}
STABILITY_LEGEND = {
    "min acc %": "lowest test accuracy among the compared runs",
    "max RMSE": "highest test RMSE among the compared runs",
    "label gini": (
        "mean over test examples of the Gini impurity of the example's predicted labels across "
        "runs (0: all runs agree; at most 1 - 1/classes)"
    ),
    "logit std": (
        "std of the logits across runs, mean over examples and classes; grows with the logit "
        "scale (smaller logits look more stable)"
    ),
    "prob std": (
        "std of the softmax probabilities across runs, mean over examples and classes; scale "
        "free, bounded (0: identical outputs; at most 0.5·√(R/(R−1)) for R runs)"
    ),
    "pred std": "std of the predictions across runs, mean over examples (in target units)",
    "pred std / target std": "pred std divided by the std of the test targets (scale free)",
    "weight std": (
        "std of each weight across runs, mean over the weights that are non-zero in at least "
        "one run (weights pruned in every run are left out)"
    ),
    "weight CV": "weight std divided by the mean |w| over the same weights (scale free)",
}


def _stability_cells(v: Variant, task: str) -> list[str]:
    """'stability over' and the stability columns; a variant with both kinds shows
    ``splits / init seeds`` and each cell as ``<over splits> / <over init seeds>``."""
    kinds = v.stability_kinds
    if not kinds:
        return ["–"] + ["–" for _ in STABILITY_COLUMNS[task]]
    cells = [" / ".join(_over(k) for k in kinds)]
    for _, key, fmt, scale in STABILITY_COLUMNS[task]:
        values = [v.stability.get(f"{k}/{key}") for k in kinds]
        cells.append(
            " / ".join("–" if x is None else fmt.format(scale * x) for x in values)
            if any(x is not None for x in values)
            else "–"
        )
    return cells


def _attack_title(attack: str, variants: Sequence[Variant]) -> str:
    """Column title of a test-loop attack; Square says how many queries it had (the test loop
    keeps it cheap, ``eval.square_queries``; hdl-eval's columns run 5,000)."""
    if attack != "square":
        return attack
    from hdl.eval_config import EvalConfig

    queries = sorted(
        {
            int(r.config.get("eval.square_queries", EvalConfig.square_queries))
            for v in variants
            for r in v.runs
        }
    )
    return f"square ({'/'.join(map(str, queries))} q)" if queries else attack


def table_rows(variants: Sequence[Variant]) -> tuple[list[str], list[list[str]], list[dict]]:
    """(header, formatted rows, raw records) of the comparison table."""
    task = variants[0].task
    kind = "acc" if task == "classification" else "rmse"
    adv = adversarial_keys(variants)
    header = ["variant", "runs", "test acc %" if kind == "acc" else "test RMSE"]
    unit = " %" if kind == "acc" else ""
    header += [f"{_attack_title(a, variants)} {kind}@{format_eps(e)}{unit}" for a, e in adv]
    found = adversarial_keys(variants, prefix="eval/")
    bounds = ("ibp", "crown")  # hdl-verify's certified accuracy (hdl.bounds), not attacks
    evals = [(a, e) for a, e in found if a not in bounds]
    header += [f"eval {a} {kind}@{format_eps(e)}{unit}" for a, e in evals]
    certified = [(a, e) for a, e in found if a in bounds]
    header += [f"certified {a} {kind}@{format_eps(e)}{unit}" for a, e in certified]
    columns = STABILITY_COLUMNS["classification" if kind == "acc" else "regression"]
    header += ["zero weights %", "stability over", *(c[0] for c in columns), "s/epoch"]
    rows, records = [], []
    pct = kind == "acc"
    for v in variants:
        row = [v.label, str(len(v.runs)), _fmt(*v.stats.get(f"test/{kind}", (math.nan, 0)), pct)]
        for split, pairs in (("test", adv), ("eval", evals), ("eval", certified)):
            row += [
                _fmt(*v.stats.get(metric_key(split, a, kind, e), (math.nan, 0)), pct)
                for a, e in pairs
            ]
        row.append(_fmt(*v.stats.get("sparsity/zero_fraction", (math.nan, 0)), True))
        row += _stability_cells(v, "classification" if pct else "regression")
        row.append(_fmt(*v.stats.get("time/epoch_s", (math.nan, 0))))
        if v.warnings:
            row[0] += " ⚠"
        rows.append(row)
        record: dict[str, Any] = {"variant": v.label, "runs": len(v.runs)}
        for key, (m, s) in v.stats.items():
            record[f"{key} mean"], record[f"{key} std"] = m, s
        record["stability/over"] = " / ".join(_over(k) for k in v.stability_kinds)
        record |= {f"stability/{k}": x for k, x in v.stability.items()}
        record |= {f"axis/{k}": x for k, x in axes(v).items()}
        record["axis/stability_over"] = _over(stability_source(v))
        records.append(record)
    return header, rows, records


def stability_legend(task: str) -> str:
    """Markdown paragraph under the table: what every stability column is."""
    columns = STABILITY_COLUMNS["classification" if task == "classification" else "regression"]
    lines = [
        "Stability columns compare the test predictions (and weights) of a variant's runs, "
        "example by example; std is the sample std across runs. The mean ± std columns are over "
        "all runs of a variant.",
        "",
        "- **stability over**: `splits`: runs with the same init `seed` and different "
        "`data.split_seed`; `init seeds`: runs with the same `data.split_seed` and different "
        "`seed`. Each is computed in every such subgroup of ≥ 2 runs and averaged over the "
        "subgroups weighted by their run counts; the two are never pooled. `splits / init seeds`: "
        "both were measured and each stability cell reads `<over splits> / <over init seeds>`. "
        "`–`: the runs vary in neither (or no two share one). The stability axis of the Pareto "
        "front is over splits where measured, else over init seeds.",
    ]
    lines += [f"- **{name}**: {STABILITY_LEGEND[name]}." for name, *_ in columns]
    return "\n".join(lines) + "\n"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, records: Sequence[dict]) -> None:
    fields = list(dict.fromkeys(k for r in records for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)


# --- the command -------------------------------------------------------------------------------
def run_compare(
    paths: Sequence[str | Path],
    out: str | Path | None = None,
    prefer: str | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Compare every run under ``paths``; write tables (and plots) to ``out``; return a summary."""
    runs = discover(paths)
    tasks = {r.task for r in runs}
    if len(tasks) > 1:
        raise DataError(f"cannot compare classification and regression runs together: {paths}")
    variants = compare(runs)
    first = Path(paths[0])
    out = (
        Path(out)
        if out
        else (first / "comparison" if len(paths) == 1 and first.is_dir() else Path("comparison"))
    )
    out.mkdir(parents=True, exist_ok=True)
    header, rows, records = table_rows(variants)
    points = {v.label: axes(v) for v in variants}
    ranked = {v.label: points[v.label] for v in variants if not v.excluded}
    excluded = {v.label: v.excluded for v in variants if v.excluded}
    weights = parse_preferences(prefer)
    ranking = recommend(ranked, weights) if ranked else []
    front = pareto_front(ranked) if ranked else []
    md = markdown_table(header, rows) + "\n" + stability_legend(variants[0].task)
    md += "\n" + ranking_markdown(front, ranking, weights, excluded, variants)
    (out / "comparison.md").write_text(md)
    write_csv(out / "comparison.csv", records)
    summary = {
        "runs": len(runs),
        "variants": {
            v.label: {
                "runs": [str(r.path) for r in v.runs],
                "warnings": v.warnings,
                "stability_over": [_over(k) for k in v.stability_kinds],
                "stability_axis_over": _over(stability_source(v)) or None,
            }
            for v in variants
        },
        "axes": points,
        "pareto_front": front,
        "preferences": weights,
        "recommended": ranking,
        "excluded": excluded,
        "table": records,
    }
    (out / "comparison.json").write_text(
        json.dumps(_strict(summary), indent=2, default=float, allow_nan=False)
    )
    files = [out / "comparison.md", out / "comparison.csv", out / "comparison.json"]
    if plots:
        from hdl.plots import write_plots

        files += write_plots(variants, points, normalise_axes(points), AXES, out)
    summary["files"] = [str(f) for f in files]
    summary["markdown"] = md
    summary["header"], summary["rows"] = header, rows
    return summary


def ranking_markdown(
    front: Sequence[str],
    ranking: Sequence[tuple[str, float]],
    weights: Mapping[str, float],
    excluded: Mapping[str, Sequence[str]],
    variants: Sequence[Variant],
) -> str:
    """The Pareto front, the recommendation, the variants not ranked (and why) and every
    warning, under the table of ``comparison.md``."""
    w = ", ".join(f"{k}={v:g}" for k, v in weights.items() if v)
    lines = [
        "## Ranking",
        "",
        "Pareto front (accuracy, robustness, sparsity, stability; ranked variants only): "
        + (", ".join(front) if front else "none (no variant can be ranked)"),
        "",
    ]
    if ranking:
        lines += [f"Best fit for {w}: **{ranking[0][0]}** (score {ranking[0][1]:.2f})", ""]
    if excluded:
        lines += ["Not ranked (never on the front nor recommended):", ""]
        lines += [f"- {label}: {'; '.join(reasons)}" for label, reasons in excluded.items()]
        lines.append("")
    warned = [(v.label, x) for v in variants for x in v.warnings]
    if warned:
        lines += ["## Warnings", ""]
        lines += [f"- ⚠ {label}: {x}" for label, x in warned]
        lines.append("")
    return "\n".join(lines)


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 160))
    table = Table(title=f"baseline vs holistic · {summary['runs']} runs (mean ± std over runs)")
    for i, name in enumerate(summary["header"]):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in summary["rows"]:
        table.add_row(*row)
    console.print(table)
    for label, info in summary["variants"].items():
        for warning in info["warnings"]:
            console.print(f"[bold yellow]⚠ {label}:[/] {warning}")
    front = ", ".join(summary["pareto_front"]) or "none (no variant can be ranked)"
    console.print(f"Pareto front (accuracy, robustness, sparsity, stability): {front}")
    for label, reasons in summary.get("excluded", {}).items():
        console.print(f"[bold yellow]not ranked: {label}[/] ({'; '.join(reasons)})")
    w = ", ".join(f"{k}={v:g}" for k, v in summary["preferences"].items() if v)
    if summary["recommended"]:
        best, score = summary["recommended"][0]
        console.print(f"best fit for {w}: [bold]{best}[/] (score {score:.2f})")
    console.print("wrote " + ", ".join(summary["files"]))


def run_selection(
    paths: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    criterion: str = "pgd",
    eps: float = 0.1,
    tolerance: float = 0.01,
) -> dict[str, Any]:
    """The protocol over a sweep (hdl.selection): per problem and split, the configuration
    chosen on validation vs the baseline, on test; writes ``selection.md`` / ``selection.json``."""
    from hdl.selection import markdown, run_protocol, summarise

    runs = discover(paths)
    attacks = {r.config.get("eval.attack", "pgd") for r in runs}
    attack = sorted(attacks)[0]
    protocol = run_protocol(runs, criterion=criterion, attack=attack, eps=eps, tolerance=tolerance)
    if not protocol:
        raise DataError(
            f"no split has a baseline run (loss.name == baseline) next to its grid under {paths}"
        )
    first = Path(paths[0])
    out = Path(out) if out else (first / "comparison" if first.is_dir() else Path("comparison"))
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(protocol, attack, eps)
    detail = {
        problem: {
            "summary": summarise(results, attack, eps),
            "splits": [vars(r) for r in results],
        }
        for problem, results in protocol.items()
    }
    summary = {
        "criterion": criterion,
        "attack": attack,
        "eps": eps,
        "tolerance": tolerance,
        "problems": detail,
    }
    (out / "selection.md").write_text(md)
    (out / "selection.json").write_text(json.dumps(_strict(summary), indent=2))
    summary["markdown"] = md
    summary["files"] = [str(out / "selection.md"), str(out / "selection.json")]
    return summary


def _strict(value: Any) -> Any:
    """JSON without NaN (null instead): strict parsers reject NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hdl-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "paths", nargs="+", help="run directories, sweep directories, or metrics.json files"
    )
    parser.add_argument("--out", help="output folder (default: <sweep dir>/comparison)")
    parser.add_argument(
        "--prefer",
        help="weights of the axes accuracy, robustness, sparsity, stability, e.g. robustness=2,sparsity=1",
    )
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument(
        "--select",
        action="store_true",
        help="the protocol: per split, choose the configuration on validation and report its "
        "test numbers against the baseline (selection.md)",
    )
    parser.add_argument("--criterion", default="pgd", choices=["pgd", "acc", "objective"])
    parser.add_argument("--select-eps", type=float, default=0.1, help="radius of the criterion")
    parser.add_argument(
        "--tolerance", type=float, default=0.01, help="val accuracy below the baseline's allowed"
    )
    args = parser.parse_args(argv)
    try:
        summary = run_compare(args.paths, args.out, args.prefer, plots=not args.no_plots)
        selection = None
        if args.select:
            selection = run_selection(
                args.paths,
                args.out,
                criterion=args.criterion,
                eps=args.select_eps,
                tolerance=args.tolerance,
            )
    except HDLError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print_summary(summary)
    if selection is not None:
        print(selection["markdown"])
        print("wrote " + ", ".join(selection["files"]))


if __name__ == "__main__":
    main()
