"""``hdl-compare``: many runs -> one baseline-vs-holistic comparison (tables and plots).

Runs are read from disk alone (``metrics.json``, ``predictions.npz``, ``weights.npz`` and, when
``hdl-eval`` ran, ``eval.json``). Runs that differ only in ``data.split_seed`` or ``seed`` form a
group (a *variant*); each variant gets mean ± std over its runs of natural accuracy, accuracy
under attack per eps, zero-weight fraction, the stability metrics of :mod:`hdl.stability`, and
training time. Written: ``comparison.md``, ``comparison.csv``, ``comparison.json`` and PNG plots.

Four axes judge a variant (higher is better, each in [0, 1] for classification): accuracy,
robustness (accuracy under the strongest attack at the largest eps), sparsity (fraction of zero
weights) and stability (1 - mean Gini impurity of predictions across splits). ``--prefer``
weights them and names the Pareto-optimal variant that fits best.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hdl.errors import ConfigError, DataError, HDLError
from hdl.stability import load_predictions, prediction_stability, weight_std

AXES = ("accuracy", "robustness", "sparsity", "stability")
# config keys that never define a variant: what a stability group varies, and run bookkeeping
IGNORED_KEYS = ("seed", "data.split_seed", "ckpt_path", "print_metrics", "test", "run_id")
IGNORED_PREFIXES = ("logger.", "callbacks.", "hydra.")
ADV_KEY = re.compile(r"^test/(?P<attack>[a-z_]+?)_(?P<kind>acc|mse|rmse)@(?P<eps>[0-9.e+-]+)$")


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
                out[f"eval/{attack}_{kind}@{float(eps):g}"] = float(values[key])
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


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Variants: runs that agree on every config key except the split/seed keys. Each variant is
    labelled by its loss preset plus the keys in which the variants differ."""
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
        labelled[label] = sorted(groups[key], key=lambda r: r.config.get("data.split_seed", 0))
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
    stability: dict[str, float]
    layers: dict[str, float]  # mean zero fraction per layer
    warnings: list[str]

    @property
    def task(self) -> str:
        return self.runs[0].task

    def mean(self, key: str) -> float:
        return self.stats.get(key, (math.nan, math.nan))[0]


def adversarial_keys(variants: Iterable[Variant], prefix: str = "test/") -> list[tuple[str, float]]:
    """(attack, eps) pairs measured in the test loop, sorted by attack then eps."""
    found = set()
    for v in variants:
        for key in v.stats:
            m = ADV_KEY.match(key.replace("eval/", "test/")) if key.startswith(prefix) else None
            if m and m["kind"] != "mse":
                found.add((m["attack"], float(m["eps"])))
    return sorted(found)


def _gradient_masking(stats: Mapping[str, tuple[float, float]], kind: str, n: int) -> list[str]:
    """Square (gradient-free) beating PGD at the same eps: PGD overstates robustness."""
    out = []
    for key, (square, _) in stats.items():
        m = ADV_KEY.match(key)
        if not m or m["attack"] != "square" or m["kind"] != kind:
            continue
        pgd = stats.get(f"test/pgd_{kind}@{m['eps']}", (math.nan,))[0]
        if math.isfinite(pgd) and square < pgd - 1.0 / max(n, 1):
            out.append(
                f"gradient masking: Square ({square:.3f}) beats PGD ({pgd:.3f}) at eps={m['eps']}"
            )
    return out


def aggregate(label: str, runs: list[Run]) -> Variant:
    keys = sorted({k for r in runs for k in r.metrics})
    stats = {k: mean_std([r.metrics.get(k, math.nan) for r in runs]) for k in keys}
    task = runs[0].task
    stability: dict[str, float] = {}
    warnings = sorted({w for r in runs for w in r.warnings})
    preds = [r.path / "predictions.npz" for r in runs]
    if len(runs) > 1 and all(p.is_file() for p in preds):
        try:
            logits, targets = load_predictions(preds)
            stability = prediction_stability(logits, targets, task)
        except ValueError as err:
            warnings.append(f"stability not measured: {err}")
        weights = [r.path / "weights.npz" for r in runs]
        if all(p.is_file() for p in weights):
            loaded = []
            for p in weights:
                with np.load(p) as f:
                    loaded.append({k: f[k] for k in f.files})
            ws = weight_std(loaded)
            if ws is not None:
                stability["weight_std"] = ws
    layers: dict[str, list[float]] = {}
    for r in runs:
        for name, frac in r.meta.get("sparsity", {}).items():
            if name != "total":
                layers.setdefault(name, []).append(float(frac))
    n_test = 0
    if preds and preds[0].is_file():
        with np.load(preds[0]) as f:
            n_test = len(f["targets"])
    kind = "acc" if task == "classification" else "rmse"
    warnings += _gradient_masking(stats, kind, n_test)
    return Variant(
        label,
        runs,
        stats,
        stability,
        {k: float(np.mean(v)) for k, v in layers.items()},
        warnings,
    )


def compare(runs: Sequence[Run]) -> list[Variant]:
    variants = [aggregate(label, rs) for label, rs in group_runs(runs).items()]
    order = {"baseline": 0, "robust": 1, "stable": 2, "sparse": 3, "holistic": 4}
    return sorted(variants, key=lambda v: (order.get(v.label.split()[0], 5), v.label))


# --- the four axes, Pareto front and preferences ---------------------------------------------
def axes(v: Variant) -> dict[str, float]:
    """The variant's position on the four holistic axes (higher is better)."""
    measured = adversarial_keys([v])
    largest = max((e for _, e in measured), default=None)
    if v.task == "classification":
        accuracy = v.mean("test/acc")
        # the strongest attack at the largest radius: the minimum accuracy over attacks
        at_largest = [v.mean(f"test/{a}_acc@{e:g}") for a, e in measured if e == largest]
        robust = min((x for x in at_largest if math.isfinite(x)), default=math.nan)
        stability = 1.0 - v.stability["gini"] if "gini" in v.stability else math.nan
    else:  # regression: negative errors, so that higher is still better
        accuracy = -v.mean("test/rmse")
        at_largest = [v.mean(f"test/{a}_rmse@{e:g}") for a, e in measured if e == largest]
        robust = -max((x for x in at_largest if math.isfinite(x)), default=math.nan)
        stability = -v.stability.get("prediction_std", math.nan)
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


def table_rows(variants: Sequence[Variant]) -> tuple[list[str], list[list[str]], list[dict]]:
    """(header, formatted rows, raw records) of the comparison table."""
    task = variants[0].task
    kind = "acc" if task == "classification" else "rmse"
    adv = adversarial_keys(variants)
    header = ["variant", "runs", "test acc %" if kind == "acc" else "test RMSE"]
    header += [f"{a} {kind}@{e:g}" + (" %" if kind == "acc" else "") for a, e in adv]
    evals = adversarial_keys(variants, prefix="eval/")
    header += [f"eval {a} {kind}@{e:g}" for a, e in evals]
    if task == "classification":
        header += ["zero weights %", "min acc %", "gini", "logit std", "weight std", "s/epoch"]
    else:
        header += ["zero weights %", "max RMSE", "pred std", "weight std", "s/epoch"]
    rows, records = [], []
    pct = kind == "acc"
    for v in variants:
        st = v.stability
        row = [v.label, str(len(v.runs)), _fmt(*v.stats.get(f"test/{kind}", (math.nan, 0)), pct)]
        row += [_fmt(*v.stats.get(f"test/{a}_{kind}@{e:g}", (math.nan, 0)), pct) for a, e in adv]
        row += [_fmt(*v.stats.get(f"eval/{a}_{kind}@{e:g}", (math.nan, 0)), pct) for a, e in evals]
        row.append(_fmt(*v.stats.get("sparsity/zero_fraction", (math.nan, 0)), True))
        if task == "classification":
            row.append(f"{100 * st['acc_min']:.1f}" if "acc_min" in st else "–")
            row += [f"{st[k]:.4f}" if k in st else "–" for k in ("gini", "logit_std", "weight_std")]
        else:
            row.append(f"{st['rmse_max']:.4f}" if "rmse_max" in st else "–")
            row += [f"{st[k]:.4f}" if k in st else "–" for k in ("prediction_std", "weight_std")]
        row.append(_fmt(*v.stats.get("time/epoch_s", (math.nan, 0))))
        if v.warnings:
            row[0] += " ⚠"
        rows.append(row)
        record: dict[str, Any] = {"variant": v.label, "runs": len(v.runs)}
        for key, (m, s) in v.stats.items():
            record[f"{key} mean"], record[f"{key} std"] = m, s
        record |= {f"stability/{k}": x for k, x in st.items()}
        record |= {f"axis/{k}": x for k, x in axes(v).items()}
        records.append(record)
    return header, rows, records


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
    weights = parse_preferences(prefer)
    ranking = recommend(points, weights)
    md = markdown_table(header, rows)
    (out / "comparison.md").write_text(md)
    write_csv(out / "comparison.csv", records)
    summary = {
        "runs": len(runs),
        "variants": {
            v.label: {"runs": [str(r.path) for r in v.runs], "warnings": v.warnings}
            for v in variants
        },
        "axes": points,
        "pareto_front": pareto_front(points),
        "preferences": weights,
        "recommended": ranking,
        "table": records,
    }
    (out / "comparison.json").write_text(json.dumps(summary, indent=2, default=float))
    files = [out / "comparison.md", out / "comparison.csv", out / "comparison.json"]
    if plots:
        from hdl.plots import write_plots

        files += write_plots(variants, points, out)
    summary["files"] = [str(f) for f in files]
    summary["markdown"] = md
    summary["header"], summary["rows"] = header, rows
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 160))
    table = Table(title=f"baseline vs holistic · {summary['runs']} runs (mean ± std over splits)")
    for i, name in enumerate(summary["header"]):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in summary["rows"]:
        table.add_row(*row)
    console.print(table)
    for label, info in summary["variants"].items():
        for warning in info["warnings"]:
            console.print(f"[bold yellow]⚠ {label}:[/] {warning}")
    front = ", ".join(summary["pareto_front"])
    console.print(f"Pareto front (accuracy, robustness, sparsity, stability): {front}")
    w = ", ".join(f"{k}={v:g}" for k, v in summary["preferences"].items() if v)
    if summary["recommended"]:
        best, score = summary["recommended"][0]
        console.print(f"best fit for {w}: [bold]{best}[/] (score {score:.2f})")
    console.print("wrote " + ", ".join(summary["files"]))


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
    args = parser.parse_args(argv)
    try:
        summary = run_compare(args.paths, args.out, args.prefer, plots=not args.no_plots)
    except HDLError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print_summary(summary)


if __name__ == "__main__":
    main()
