"""``hdl-eval``: the holistic evaluation of a trained run (a run directory or a checkpoint).

- Robustness: torchattacks PGD (l_inf and l_2, random start), FGSM, APGD, AutoAttack and the
  gradient-free Square attack, at a list of radii; accuracy (RMSE for regression) per radius.
- Sanity checks, reported beside the numbers rather than hidden (gradient masking is the
  classic false win of gradient-norm-regularised models): accuracy does not increase with
  eps; PGD is not weaker than FGSM; accuracy reaches chance at a large eps; the gradient-free
  Square attack does not beat PGD.
- Sparsity on the real (masked) weights: zeros per layer and in total, dead units, unused
  input features, effective parameter count.

The result is printed and written to ``eval.json`` in the run directory, where ``hdl-compare``
picks it up.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hdl.attacks import EVAL_SQUARE_QUERIES
from hdl.errors import ConfigError, HDLError
from hdl.robustness import (
    chance_radius,
    default_l2_radii,
    parse_attack,
    robustness,
    sanity_checks,
)
from hdl.runs import load_run
from hdl.sparsity_report import sparsity_report


# --- one run -------------------------------------------------------------------------------
def evaluate_run(
    path: str | Path,
    *,
    attacks: Sequence[str] = ("pgd", "fgsm", "pgd_l2", "square"),
    eps: Sequence[float] | None = None,
    l2_eps: Sequence[float] | None = None,
    steps: int | None = None,
    max_examples: int | None = None,
    device: str = "cpu",
    write: bool = True,
    square_queries: int = EVAL_SQUARE_QUERIES,
) -> dict[str, Any]:
    """Evaluate one run on its test split; write ``eval.json`` into its run dir when ``write``."""
    if max_examples is not None and (
        isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1
    ):
        raise ConfigError(f"--max-examples must be a positive integer, got {max_examples!r}")
    run = load_run(path, device)
    data, module = run.data, run.module
    x, y = data.tensors["test"]
    total = len(y)
    if max_examples:
        x, y = x[:max_examples], y[:max_examples]
    subset = f"all {total}" if len(y) == total else f"first {len(y)} of {total}"
    eps = [float(e) for e in (eps if eps is not None else run.cfg.eval.eps)]
    n_features = int(x[0].numel())
    l2_eps = [float(e) for e in l2_eps] if l2_eps is not None else default_l2_radii(eps, n_features)
    steps = int(steps if steps is not None else run.cfg.eval.steps)
    task, rng = data.task, data.input_range
    if task == "regression":
        attacks = [a for a in attacks if parse_attack(a)[0] in ("pgd", "fgsm")]
    large = chance_radius(rng)
    results = robustness(
        module.net,
        x,
        y,
        attacks=attacks,
        eps=[*eps, large] if task == "classification" else eps,
        l2_eps=l2_eps,
        steps=steps,
        input_range=rng,
        task=task,
        num_classes=data.num_outputs if task == "classification" else None,
        square_queries=square_queries,
    )
    chance = None
    if task == "classification":
        chance = float(torch.bincount(y, minlength=data.num_outputs).max()) / len(y)
    # where each number comes from, kept beside it (a later call may use another subset)
    source = {"test_examples": len(y), "subset": subset, "steps": steps, "chance": chance}
    for attack, by_eps in results.items():
        queries = square_queries if parse_attack(attack)[0] == "square" else None
        for values in by_eps.values():
            values.update(source, square_queries=queries)
    report = {
        "run_dir": str(run.run_dir),
        "checkpoint": str(run.checkpoint),
        "task": task,
        "test_examples": len(y),
        "total_test_examples": total,
        "subset": subset,
        "steps": steps,
        "square_queries": square_queries,
        "chance": chance,
        "chance_eps": large if task == "classification" else None,
        "robustness": results,
        "warnings": sanity_checks(results, task, len(y), chance, large),
        "sparsity": sparsity_report(module.net, x),
    }
    if write:
        path = run.run_dir / "eval.json"
        report = merge_reports(_read_report(path), report)
        path.write_text(json.dumps(_finite(report), indent=2, allow_nan=False))
    return report


def _finite(value: Any) -> Any:
    """Strict JSON: NaN and infinities as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _read_report(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def merge_reports(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` merged into the earlier ``eval.json``: every (attack, eps) result computed before
    is kept unless this call recomputed it; each says the test subset it came from. The sanity
    checks are redone within each subset (numbers of different subsets are not compared), and
    ``calls`` lists every call."""
    merged = dict(new)
    robustness_ = {a: dict(v) for a, v in ((old or {}).get("robustness") or {}).items()}
    for attack, by_eps in new["robustness"].items():
        robustness_.setdefault(attack, {}).update(by_eps)
    merged["robustness"] = robustness_
    call = {k: new.get(k) for k in ("checkpoint", "test_examples", "subset", "steps")}
    call["attacks"] = sorted(new["robustness"])
    merged["calls"] = [*((old or {}).get("calls") or []), call]
    groups: dict[int, dict[str, dict[str, Any]]] = {}
    for attack, by_eps in robustness_.items():
        for eps, values in by_eps.items():
            n = int(values.get("test_examples") or new["test_examples"])
            groups.setdefault(n, {}).setdefault(attack, {})[eps] = values
    warnings: list[str] = []
    for n, results in sorted(groups.items(), reverse=True):
        chance = next((v.get("chance") for r in results.values() for v in r.values()), None)
        found = sanity_checks(results, new["task"], n, chance, new.get("chance_eps"))
        subset = next(v.get("subset") for r in results.values() for v in r.values())
        if len(groups) > 1:
            found = [f"{w} [{subset} test examples]" for w in found]
        warnings += found
    merged["warnings"] = warnings
    return merged


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    key = "accuracy" if report["task"] == "classification" else "rmse"
    queries = report.get("square_queries")
    table = Table(
        title=f"{report['run_dir']} · robust {key} (correct on the clean input and under attack; "
        f"{report['steps']} steps" + (f", Square {queries} queries" if queries else "") + ")"
    )
    table.add_column("attack")
    radii = sorted({e for r in report["robustness"].values() for e in r}, key=float)
    for e in radii:
        table.add_column(f"eps={e}", justify="right")
    for attack, by_eps in report["robustness"].items():
        table.add_row(attack, *(f"{by_eps[e][key]:.3f}" if e in by_eps else "" for e in radii))
    console.print(table)
    s = report["sparsity"]
    console.print(
        f"sparsity: {s['zero_fraction']:.1%} zero weights, {s['effective_parameters']:.0f} of "
        f"{s['parameters']:.0f} parameters non-zero, {s['dead_units']:.0f} dead units, "
        f"{s.get('inactive_units', 0):.0f} inactive units, unused input features: "
        f"{s['unused_input_features']}"
    )
    for warning in report["warnings"]:
        console.print(f"[bold yellow]warning:[/] {warning}")
    if not report["warnings"]:
        console.print(
            "sanity checks passed (monotone in eps, PGD >= FGSM, Square <= PGD, chance at large eps)"
        )


def _floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from None
    if any(v < 0 or not math.isfinite(v) for v in values):
        raise ConfigError(f"radii must be finite and >= 0, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hdl-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories or checkpoint files")
    parser.add_argument(
        "--attacks",
        default="pgd,fgsm,pgd_l2,square",
        help="comma-separated: pgd, fgsm, fgsm_rs, apgd, autoattack, square, each optionally "
        "with _linf / _l2 (default: %(default)s)",
    )
    parser.add_argument("--eps", help="l_inf radii, e.g. 0.05,0.1 (default: the run's eval.eps)")
    parser.add_argument("--l2-eps", help="l_2 radii (default: eps * sqrt(d) / 4)")
    parser.add_argument("--steps", type=int, help="attack steps (default: the run's eval.steps)")
    parser.add_argument("--max-examples", type=int, help="evaluate the first N test examples")
    parser.add_argument(
        "--square-queries",
        type=int,
        default=EVAL_SQUARE_QUERIES,
        help="queries of the gradient-free Square attack, run at every eps (default: %(default)s)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        for flag, value in (
            ("--max-examples", args.max_examples),
            ("--steps", args.steps),
            ("--square-queries", args.square_queries),
        ):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be a positive integer, got {value}")
        attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
        for a in attacks:
            parse_attack(a)
        for path in args.runs:
            report = evaluate_run(
                path,
                attacks=attacks,
                eps=_floats(args.eps),
                l2_eps=_floats(args.l2_eps),
                steps=args.steps,
                max_examples=args.max_examples,
                device=args.device,
                square_queries=args.square_queries,
            )
            print_report(report)
            print(f"wrote {Path(report['run_dir']) / 'eval.json'}")
    except HDLError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
