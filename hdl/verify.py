"""``hdl-verify``: certified accuracy of a trained run (a run directory or a checkpoint).

For every eps, on the run's test split: certified accuracy by interval bound propagation (IBP)
and by CROWN (:mod:`hdl.bounds`), torchattacks PGD accuracy beside them (an upper bound of the
true robust accuracy, as certified accuracy is a lower bound), natural accuracy, the unstable
ReLUs per layer (pre-activation bounds l < 0 < u from CROWN's intermediate bounds, averaged per
example) and the seconds per example of each bound. Certified: the lower bound of every margin
z_y - z_i over the l_inf ball ∩ the input box is > 0 and the clean input is classified
correctly. Written to ``verify.json`` in the run directory (metric keys
``eval/ibp_acc@eps`` and ``eval/crown_acc@eps``), where ``hdl-compare`` picks it up.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hdl.bounds import BOUND_METHODS, _MaxPool, certify, linearize
from hdl.errors import ConfigError, HDLError
from hdl.keys import format_eps, metric_key


def _box(x: torch.Tensor, input_range: Sequence[float] | None) -> tuple[float, float] | None:
    """The verified box: the data's input range widened to hold every evaluated input, so it
    contains the box of every attack batch (:func:`hdl.attacks._domain`): a sound bound over
    it is a bound over what the attack searches."""
    if input_range is None:
        return None
    return min(float(input_range[0]), float(x.min())), max(float(input_range[1]), float(x.max()))


def verify_run(
    path: str | Path,
    *,
    eps: Sequence[float] | None = None,
    methods: Sequence[str] = BOUND_METHODS,
    steps: int | None = None,
    max_examples: int | None = None,
    batch_size: int = 256,
    device: str = "cpu",
    attack: bool = True,
    write: bool = True,
) -> dict[str, Any]:
    """Verify one run on its test split; write ``verify.json`` into its run dir when ``write``."""
    from hdl.attacks import evaluate_under_attack, predict
    from hdl.runs import load_run
    from hdl.sparsity import parameter_counts, zero_fractions

    for m in methods:
        if m not in BOUND_METHODS:
            raise ConfigError(f"--methods: unknown bound {m!r} (known: {', '.join(BOUND_METHODS)})")
    if int(batch_size) < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size!r}")
    run = load_run(path, device)
    data, net = run.data, run.module.net.eval()
    if data.task != "classification":
        raise ConfigError(
            f"{run.run_dir}: hdl-verify certifies classifiers, this run is {data.task}"
        )
    x, y = data.tensors["test"]
    if max_examples:
        x, y = x[:max_examples], y[:max_examples]
    x, y = x.to(device), y.to(device)
    eps = [float(e) for e in (eps if eps is not None else run.cfg.eval.eps)]
    steps = int(steps if steps is not None else run.cfg.eval.steps)
    bnet = linearize(net, x.shape[1:])  # refuses unsupported layers before any work
    box = _box(x, data.input_range)
    n = len(y)
    correct = predict(net, x).argmax(dim=1) == y if n else torch.zeros(0, dtype=torch.bool)
    natural = float(correct.float().mean()) if n else float("nan")
    relu_units = {name: math.prod(bnet.ops[i].in_shape) for i, name in bnet.relus}
    results: dict[str, dict[str, Any]] = {}
    metrics: dict[str, float] = {}
    warnings: list[str] = []
    for e in eps:
        row: dict[str, Any] = {}
        for method in methods:
            certified = torch.zeros(n, dtype=torch.bool, device=x.device)
            unstable: dict[str, float] = {}
            if n:  # warm-up, untimed: lazy initialisation must not count as bound time
                certify(
                    net, x[:batch_size], y[:batch_size], e, method=method, input_range=box, net=bnet
                )
            start = time.perf_counter()
            for i in range(0, n, batch_size):
                xb, yb = x[i : i + batch_size], y[i : i + batch_size]
                margins, counts = certify(net, xb, yb, e, method=method, input_range=box, net=bnet)
                certified[i : i + batch_size] = correct[i : i + batch_size] & (margins > 0).all(1)
                for name, c in counts.items():
                    unstable[name] = unstable.get(name, 0.0) + float(c.sum())
            seconds = time.perf_counter() - start
            entry: dict[str, Any] = {
                "certified_accuracy": float(certified.float().mean()) if n else float("nan"),
                "seconds_per_example": seconds / max(n, 1),
            }
            if method == "crown":
                entry["unstable_relus"] = {k: v / max(n, 1) for k, v in unstable.items()}
                entry["unstable_relus_total"] = sum(entry["unstable_relus"].values())
            row[method] = entry
            metrics[metric_key("eval", method, "acc", e)] = entry["certified_accuracy"]
        if attack and n:
            found = evaluate_under_attack(
                net,
                x,
                y,
                eps_list=[e],
                attack="pgd",
                norm="inf",
                steps=steps,
                input_range=data.input_range,
                num_classes=data.num_outputs,
                cumulative=False,
            )
            row["pgd"] = {"accuracy": found[e]["accuracy"]}
        results[format_eps(e)] = row
        warnings += _checks(row, natural, e, n)
    total, nonzero = parameter_counts(net)
    report = {
        "run_dir": str(run.run_dir),
        "checkpoint": str(run.checkpoint),
        "test_examples": n,
        "input_range": list(data.input_range) if data.input_range is not None else None,
        "box": list(box) if box is not None else None,
        "norm": "inf",
        "methods": list(methods),
        "attack": {"name": "pgd", "steps": steps} if attack else None,
        "natural_accuracy": natural,
        "results": results,
        "relu_units": relu_units,
        "crown_through_max_pool": (
            "interval bound (the backward pass stops at every max-pool output)"
            if any(isinstance(op, _MaxPool) for op in bnet.ops)
            else None
        ),
        "zero_fraction": zero_fractions(net)["total"],
        "parameters": total,
        "nonzero_parameters": nonzero,
        "metrics": metrics,
        "warnings": warnings,
    }
    if write:
        (run.run_dir / "verify.json").write_text(json.dumps(report, indent=2))
    return report


def _checks(row: dict[str, Any], natural: float, eps: float, n: int) -> list[str]:
    """certified <= attack <= natural and CROWN >= IBP, up to one example: a violation means a
    bug (an unsound bound or a broken attack count), never hidden."""
    tol = 1.0 / max(n, 1) * 0.5
    out = []
    pgd = row.get("pgd", {}).get("accuracy")
    for method in BOUND_METHODS:
        cert = row.get(method, {}).get("certified_accuracy")
        if cert is None:
            continue
        if pgd is not None and cert > pgd + tol:
            out.append(
                f"eps={format_eps(eps)}: {method} certified accuracy {cert:.3f} exceeds PGD "
                f"accuracy {pgd:.3f}: the bound is unsound"
            )
    if pgd is not None and pgd > natural + tol:
        out.append(f"eps={format_eps(eps)}: PGD accuracy {pgd:.3f} exceeds natural {natural:.3f}")
    if "ibp" in row and "crown" in row:
        if row["crown"]["certified_accuracy"] < row["ibp"]["certified_accuracy"] - tol:
            out.append(f"eps={format_eps(eps)}: CROWN certifies fewer points than IBP")
    return out


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(
        title=f"{report['run_dir']} · certified accuracy (l_inf, {report['test_examples']} test "
        f"examples, natural {report['natural_accuracy']:.3f})"
    )
    for col in ("eps", "PGD acc", *(f"{m} cert" for m in report["methods"])):
        table.add_column(col, justify="right")
    table.add_column("unstable ReLUs / ex", justify="right")
    for m in report["methods"]:
        table.add_column(f"{m} s/ex", justify="right")
    for e, row in report["results"].items():
        pgd = row.get("pgd", {}).get("accuracy")
        crown = row.get("crown", {})
        table.add_row(
            e,
            "" if pgd is None else f"{pgd:.3f}",
            *(f"{row[m]['certified_accuracy']:.3f}" for m in report["methods"]),
            f"{crown['unstable_relus_total']:.1f}" if crown else "",
            *(f"{row[m]['seconds_per_example']:.2e}" for m in report["methods"]),
        )
    console.print(table)
    if report.get("crown_through_max_pool"):
        console.print(f"CROWN through max-pool layers: {report['crown_through_max_pool']}")
    for w in report["warnings"]:
        console.print(f"[bold yellow]warning:[/] {w}")


def _radii(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--eps: expected comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 or not math.isfinite(v) for v in values):
        raise ConfigError(f"--eps: radii must be finite and >= 0, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hdl-verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories or checkpoint files")
    parser.add_argument("--eps", help="l_inf radii, e.g. 0.05,0.1 (default: the run's eval.eps)")
    parser.add_argument(
        "--methods",
        default=",".join(BOUND_METHODS),
        help="bounds: ibp, crown (default: %(default)s)",
    )
    parser.add_argument("--steps", type=int, help="PGD steps (default: the run's eval.steps)")
    parser.add_argument("--no-attack", action="store_true", help="skip the PGD column")
    parser.add_argument("--max-examples", type=int, help="verify the first N test examples")
    parser.add_argument("--batch-size", type=int, default=256, help="examples per bound pass")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's)")
    args = parser.parse_args(argv)
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ConfigError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        for path in args.runs:
            report = verify_run(
                path,
                eps=_radii(args.eps),
                methods=methods,
                steps=args.steps,
                max_examples=args.max_examples,
                batch_size=args.batch_size,
                device=args.device,
                attack=not args.no_attack,
            )
            print_report(report)
            print(f"wrote {Path(report['run_dir']) / 'verify.json'}")
    except HDLError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
