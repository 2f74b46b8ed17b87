"""The paper's protocol: per split, choose a holistic configuration on **validation**, then
report the chosen models' test numbers against the baseline (docs/protocol.md).

Runs are grouped into *problems* (everything but the loss and the split/init seeds: a data set
with its model and budget) and, inside a problem, by ``data.split_seed``. On each split the
baseline run (``loss.name == baseline``) sets the bar: among the other runs (the grid) whose
validation accuracy is within ``tolerance`` of the baseline's and which did not collapse on
validation, the one with the best validation criterion is chosen (default: robust accuracy under
the eval attack at ``eps``; ties broken by the fraction of zero weights). Only ``val/``,
``sparsity/`` and ``params/`` metrics and the validation flags reach the choice
(:func:`validation_view`): the test split never chooses anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hdl.keys import metric_key

VALIDATION_PREFIXES = ("val/", "sparsity/", "params/")
CRITERIA = ("pgd", "acc", "objective")
# keys that never define a problem: the loss (what is chosen), the seeds, run bookkeeping
_NOT_PROBLEM = ("seed", "data.split_seed", "ckpt_path", "print_metrics", "test", "run_id", "resume")
_NOT_PROBLEM_PREFIXES = ("loss.", "logger.", "callbacks.", "hydra.")


def validation_view(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics a choice may read: validation, sparsity and size; never ``test/``."""
    return {k: v for k, v in metrics.items() if k.startswith(VALIDATION_PREFIXES)}


@dataclass
class Candidate:
    label: str  # the configuration, e.g. "holistic loss.robust.eps=0.2 loss.sparse.l0=0.1"
    val: dict[str, float]  # validation_view of its metrics
    val_flags: list[str] = field(default_factory=list)


def criterion_value(c: Candidate, criterion: str, attack: str, eps: float) -> float:
    adv = c.val.get(metric_key("val", attack, "acc", eps), math.nan)
    if criterion == "pgd":
        return adv
    if criterion == "acc":
        return c.val.get("val/acc", math.nan)
    return c.val.get("val/acc", math.nan) + adv + 0.5 * c.val.get("sparsity/zero_fraction", 0.0)


def choose(
    baseline: Candidate,
    grid: Sequence[Candidate],
    *,
    criterion: str = "pgd",
    attack: str = "pgd",
    eps: float = 0.1,
    tolerance: float = 0.01,
) -> tuple[Candidate, str]:
    """The chosen candidate and why. The baseline is chosen when no grid candidate is within
    ``tolerance`` of its validation accuracy without collapsing on validation."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    bar = baseline.val.get("val/acc", math.nan) - tolerance
    eligible = [
        c
        for c in grid
        if not c.val_flags
        and c.val.get("val/acc", -math.inf) >= bar - 1e-12
        and math.isfinite(criterion_value(c, criterion, attack, eps))
    ]
    if not eligible:
        return baseline, f"no candidate within {tolerance:g} of the baseline's val/acc"

    def rank(c: Candidate) -> tuple[float, float, float]:
        return (
            round(criterion_value(c, criterion, attack, eps), 9),
            c.val.get("sparsity/zero_fraction", 0.0),
            c.val.get("val/acc", 0.0),
        )

    best = max(eligible, key=rank)
    return best, f"best val {criterion} among {len(eligible)} of {len(grid)} within tolerance"


# --- the protocol over a sweep ----------------------------------------------------------------
@dataclass
class SplitResult:
    split: int
    chosen: str
    reason: str
    baseline: dict[str, float]  # test metrics of the baseline run
    selected: dict[str, float]  # test metrics of the chosen run
    flags: list[str]  # test flags of the chosen run


def _problem(config: Mapping[str, Any]) -> tuple:
    return tuple(
        sorted(
            (k, repr(v))
            for k, v in config.items()
            if k not in _NOT_PROBLEM and not k.startswith(_NOT_PROBLEM_PREFIXES)
        )
    )


def _label(config: Mapping[str, Any], differing: set[str]) -> str:
    parts = [str(config.get("loss.name", "run"))]
    parts += [f"{k}={config[k]}" for k in sorted(differing) if k in config]
    return " ".join(parts)


def run_protocol(
    runs: Sequence[Any],
    *,
    criterion: str = "pgd",
    attack: str = "pgd",
    eps: float = 0.1,
    tolerance: float = 0.01,
    baseline_name: str = "baseline",
) -> dict[str, list[SplitResult]]:
    """{problem label: per-split results}. ``runs`` have ``config`` (flat), ``metrics`` and
    ``meta`` (``flags``), as :class:`hdl.compare.Run`."""
    problems: dict[tuple, list[Any]] = {}
    for run in runs:
        problems.setdefault(_problem(run.config), []).append(run)
    keys = list(problems)
    differing_problem = {
        k for key in keys for k, _ in key if len({dict(g).get(k) for g in keys}) > 1
    }
    out: dict[str, list[SplitResult]] = {}
    for members in problems.values():
        config0 = members[0].config
        name = str(config0.get("data.name", "data"))
        extra = [
            f"{k}={config0[k]}"
            for k in sorted(differing_problem)
            if not k.startswith("data.") and k in config0  # data presets: named by data.name
        ]
        problem_label = " ".join([name, *extra])
        loss_keys = {
            k for r in members for k in r.config if k.startswith("loss.") and k != "loss.name"
        }
        differing = {k for k in loss_keys if len({repr(r.config.get(k)) for r in members}) > 1}
        by_split: dict[int, list[Any]] = {}
        for r in members:
            by_split.setdefault(int(r.config.get("data.split_seed", 0)), []).append(r)
        results = []
        for split, rs in sorted(by_split.items()):
            base = [r for r in rs if r.config.get("loss.name") == baseline_name]
            if not base:
                continue
            base_run = base[0]
            grid = [
                r for r in rs if r is not base_run and r.config.get("loss.name") != baseline_name
            ]
            cands = {
                id(r): Candidate(
                    _label(r.config, differing),
                    validation_view(r.metrics),
                    [f for f in r.meta.get("flags", []) if "(val)" in f],
                )
                for r in [base_run, *grid]
            }
            chosen, reason = choose(
                cands[id(base_run)],
                [cands[id(r)] for r in grid],
                criterion=criterion,
                attack=attack,
                eps=eps,
                tolerance=tolerance,
            )
            chosen_run = next(r for r in [base_run, *grid] if cands[id(r)] is chosen)
            results.append(
                SplitResult(
                    split,
                    chosen.label,
                    reason,
                    _test(base_run.metrics),
                    _test(chosen_run.metrics),
                    [f for f in chosen_run.meta.get("flags", []) if "(test)" in f],
                )
            )
        if results:
            out[problem_label] = results
    return out


def _test(metrics: Mapping[str, float]) -> dict[str, float]:
    keep = ("test/", "sparsity/zero_fraction")
    return {k: v for k, v in metrics.items() if k.startswith(keep)}


# --- the summary against the targets -----------------------------------------------------------
@dataclass(frozen=True)
class Targets:
    max_acc_drop: float = 0.01  # natural accuracy down at most 1 point
    min_pgd_gain: float = 0.05  # PGD accuracy up at least 5 points ...
    pgd_gain_below: float = 0.95  # ... wherever the baseline is below 95 %
    min_zero_fraction: float = 0.5


def summarise(
    results: Sequence[SplitResult], attack: str, eps: float, targets: Targets | None = None
) -> dict[str, Any]:
    """Mean ± std over splits for baseline and selected, and each target met or missed."""
    targets = targets or Targets()

    def stats(side: Callable[[SplitResult], Mapping[str, float]], key: str) -> tuple[float, float]:
        values = np.array([side(r).get(key, math.nan) for r in results], dtype=float)
        values = values[np.isfinite(values)]
        if values.size == 0:
            return math.nan, math.nan
        return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0

    pgd = metric_key("test", attack, "acc", eps)
    s: dict[str, Any] = {"splits": len(results)}
    for side, getter in (("baseline", lambda r: r.baseline), ("selected", lambda r: r.selected)):
        for key, name in (("test/acc", "acc"), (pgd, "pgd"), ("sparsity/zero_fraction", "zeros")):
            s[f"{side}/{name}"] = stats(getter, key)
    b_acc, b_std = s["baseline/acc"]
    h_acc, h_std = s["selected/acc"]
    b_pgd, h_pgd = s["baseline/pgd"][0], s["selected/pgd"][0]
    collapsed = [f for r in results for f in r.flags]
    checks = {
        "acc": h_acc >= b_acc - targets.max_acc_drop - 1e-12,
        "pgd": b_pgd >= targets.pgd_gain_below or h_pgd >= b_pgd + targets.min_pgd_gain - 1e-12,
        "zeros": s["selected/zeros"][0] >= targets.min_zero_fraction,
        "collapse": not collapsed,
        "std": h_std <= b_std + 1e-12,
    }
    s["targets"] = checks
    s["chosen"] = [r.chosen for r in results]
    s["collapse_flags"] = collapsed
    return s


def markdown(
    protocol: Mapping[str, Sequence[SplitResult]],
    attack: str,
    eps: float,
    targets: Targets | None = None,
) -> str:
    """The suite table: per problem, baseline vs selected (mean ± std over splits) and targets."""
    targets = targets or Targets()
    pct = lambda m: "–" if not math.isfinite(m[0]) else f"{100 * m[0]:.1f} ± {100 * m[1]:.1f}"  # noqa: E731
    head = (
        f"| data | splits | baseline acc % | selected acc % | baseline {attack}@{eps:g} % | "
        f"selected {attack}@{eps:g} % | selected zeros % | targets missed |"
    )
    lines = [head, "|" + " --- |" * 8]
    for problem, results in protocol.items():
        s = summarise(results, attack, eps, targets)
        missed = [k for k, ok in s["targets"].items() if not ok]
        lines.append(
            f"| {problem} | {s['splits']} | {pct(s['baseline/acc'])} | {pct(s['selected/acc'])} | "
            f"{pct(s['baseline/pgd'])} | {pct(s['selected/pgd'])} | {pct(s['selected/zeros'])} | "
            f"{', '.join(missed) if missed else 'none'} |"
        )
    legend = (
        "\nTargets (per data set, over its splits): **acc**: selected natural accuracy at most "
        f"{100 * targets.max_acc_drop:g} point below the baseline's; **pgd**: selected PGD accuracy "
        f"at ε {eps:g} at least {100 * targets.min_pgd_gain:g} points above the baseline's wherever "
        f"that is below {100 * targets.pgd_gain_below:g} %; **zeros**: at least "
        f"{100 * targets.min_zero_fraction:g} % of the weights exactly zero; **collapse**: no "
        "selected run collapsed on test; **std**: test-accuracy std across splits no higher than "
        "the baseline's. The configuration of each split is chosen on validation only.\n"
    )
    return "\n".join(lines) + "\n" + legend
