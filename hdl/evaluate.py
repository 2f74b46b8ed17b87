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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from hdl.attacks import EVAL_SQUARE_QUERIES
from hdl.errors import ConfigError, DataError, HDLError
from hdl.keys import format_eps

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid)


# --- loading a run -----------------------------------------------------------------------------
@dataclass
class LoadedRun:
    run_dir: Path
    checkpoint: Path
    cfg: DictConfig
    data: Any  # the run's data module, arrays loaded and split exactly as in training
    module: Any  # HolisticModule with the checkpoint's weights, in eval mode


def find_run(path: str | Path) -> tuple[Path, Path]:
    """(run dir, checkpoint) from a run dir (uses ``checkpoints/last.ckpt``) or a ``.ckpt``."""
    path = Path(path)
    if path.is_file() and path.suffix == ".ckpt":
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return run_dir, path
    if path.is_dir():
        ckpt = path / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise DataError(f"{path}: no checkpoints/last.ckpt in this run directory")
        return path, ckpt
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


def load_run(path: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild a run's data and model from its saved config and load its checkpoint."""
    from hdl.train import build

    run_dir, ckpt = find_run(path)
    cfg = run_config(run_dir)
    data, module = build(cfg)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    module.load_state_dict(state["state_dict"])
    module.to(device).eval()
    return LoadedRun(run_dir, ckpt, cfg, data, module)


# --- robustness ----------------------------------------------------------------------------
def attack_label(name: str, norm: str) -> str:
    """``hdl-eval``'s name of an attack at a norm (``pgd_linf``, ``pgd_l2``, ``fgsm_rs_linf``):
    the attack part of its ``eval/...`` metric keys; :func:`parse_attack` reads it back."""
    return f"{name}_l{norm}"


def parse_attack(spec: str) -> tuple[str, str]:
    """``pgd`` / ``pgd_l2`` / ``apgd_linf`` / ``fgsm_rs`` ... -> (attack, norm)."""
    from hdl.attacks import ATTACKS

    name, norm = spec, "inf"
    if spec not in ATTACKS:
        head, _, suffix = spec.rpartition("_")
        name, norm = head, {"linf": "inf", "l2": "2"}.get(suffix)
    if name not in ATTACKS or norm is None or norm not in ATTACKS[name].norms:
        known = ", ".join(f"{a} ({'/'.join('l' + n for n in s.norms)})" for a, s in ATTACKS.items())
        raise ConfigError(
            f"--attacks: unknown attack {spec!r} (known: {known}; add _linf or _l2 to choose "
            "the norm)"
        )
    return name, norm


def default_l2_radii(eps: Sequence[float], n_features: int) -> list[float]:
    """l_2 radii paired with l_inf radii the customary way, eps * sqrt(d) / 4 (MNIST: 0.3 -> 2.1,
    the usual 2.0), to 3 significant digits."""
    return [float(f"{e * math.sqrt(n_features) / 4:.3g}") for e in eps]


def robustness(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    attacks: Sequence[str],
    eps: Sequence[float],
    l2_eps: Sequence[float],
    steps: int = 40,
    input_range: tuple[float, float] | None = None,
    task: str = "classification",
    num_classes: int | None = None,
    seed: int = 0,
    square_queries: int = EVAL_SQUARE_QUERIES,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{attack_norm: {eps: metrics}}`` per attack; each radius attacked on its own (not
    cumulative, so that the monotonicity check below can catch a weak attack), an example
    counted as robust only when it is correct on the clean input too."""
    from hdl.attacks import evaluate_under_attack

    results: dict[str, dict[str, dict[str, float]]] = {}
    for spec in attacks:
        name, norm = parse_attack(spec)
        radii = [0.0, *(l2_eps if norm == "2" else eps)]
        found = evaluate_under_attack(
            model,
            x,
            y,
            eps_list=radii,
            attack=name,
            norm=norm,
            steps=steps,
            input_range=input_range,
            task=task,
            num_classes=num_classes,
            seed=seed,
            cumulative=False,
            queries=square_queries,
        )
        results[attack_label(name, norm)] = {format_eps(e): m for e, m in found.items()}
    return results


def sanity_checks(
    results: dict[str, dict[str, dict[str, float]]],
    task: str,
    n: int,
    chance: float | None = None,
    chance_eps: float | None = None,
) -> list[str]:
    """Warnings for results that an honest attack evaluation should not produce.

    The tolerance is one test example (1/n) for accuracy and 1 % for RMSE. The chance check
    applies to the attacks evaluated at ``chance_eps`` (or beyond)."""
    warnings: list[str] = []
    key = "accuracy" if task == "classification" else "rmse"
    # stronger(a, b): result a shows a clearly stronger attack (lower accuracy, higher RMSE) than b
    stronger = (lambda a, b: a < b - 1.0 / n) if key == "accuracy" else (lambda a, b: a > b * 1.01)
    for attack, by_eps in results.items():
        radii = sorted(by_eps, key=float)
        for small, large in zip(radii, radii[1:], strict=False):
            if stronger(by_eps[small][key], by_eps[large][key]):
                warnings.append(
                    f"{attack}: {key} at eps={large} ({by_eps[large][key]:.3f}) is better than at "
                    f"eps={small} ({by_eps[small][key]:.3f}): the attack is not finding the worst case"
                )
    for norm in ("inf", "2"):
        pgd = results.get(attack_label("pgd", norm))
        weaker = results.get(attack_label("fgsm", norm))
        for eps in sorted(set(pgd or {}) & set(weaker or {}), key=float):
            if float(eps) > 0 and stronger(weaker[eps][key], pgd[eps][key]):
                warnings.append(
                    f"PGD ({pgd[eps][key]:.3f}) is weaker than FGSM ({weaker[eps][key]:.3f}) at "
                    f"eps={eps}: gradients may be masked or the step size is off"
                )
        square = results.get(attack_label("square", norm))
        for eps in sorted(set(pgd or {}) & set(square or {}), key=float):
            if float(eps) > 0 and stronger(square[eps][key], pgd[eps][key]):
                warnings.append(
                    f"gradient masking: the gradient-free Square attack ({square[eps][key]:.3f}) "
                    f"beats PGD ({pgd[eps][key]:.3f}) at eps={eps}; PGD numbers overstate robustness"
                )
    if chance is not None and chance_eps is not None and task == "classification":
        for attack, by_eps in results.items():
            largest = max(by_eps, key=float)
            acc = by_eps[largest]["accuracy"]
            if float(largest) >= chance_eps and acc > chance + 0.05 + 1.0 / n:
                warnings.append(
                    f"{attack}: accuracy {acc:.3f} at the large eps={largest} stays above chance "
                    f"({chance:.3f}): the attack may be failing (or eps is not large enough)"
                )
    return warnings


def chance_radius(input_range: tuple[float, float] | None) -> float:
    """An l_inf radius at which every input can be moved to the same point: half the input
    range (the box's centre is within reach of every input); 10 standard deviations for
    standardised (unbounded) features."""
    return 10.0 if input_range is None else (input_range[1] - input_range[0]) / 2


# --- sparsity ------------------------------------------------------------------------------
@torch.no_grad()
def sparsity_report(net: nn.Module, x: Tensor | None = None) -> dict[str, Any]:
    """Zeros of the effective weights per layer and in total, structurally dead units (an output
    unit whose incoming weights are all zero), units inactive on every input of ``x`` (activation
    output 0, measured with forward hooks), unused input features (:func:`unused_inputs`) and the
    real and non-zero parameter counts."""
    from hdl.sparsity import _weight_modules, parameter_counts, zero_fractions

    layers: dict[str, dict[str, float]] = {}
    for mod_name, module, name in _weight_modules(net):
        w = getattr(module, name)
        rows = w.reshape(w.shape[0], -1)
        key = f"{mod_name}.{name}" if mod_name else name
        layers[key] = {
            "size": float(w.numel()),
            "zero_fraction": float((w == 0).float().mean()),
            "dead_units": float((rows == 0).all(dim=1).sum()),
            "units": float(rows.shape[0]),
        }
    total, nonzero = parameter_counts(net)
    report: dict[str, Any] = {
        "zero_fraction": zero_fractions(net)["total"],
        "layers": layers,
        "dead_units": float(sum(v["dead_units"] for v in layers.values())),
        "unused_input_features": unused_inputs(net),
        "parameters": float(total),
        "effective_parameters": float(nonzero),
    }
    if x is not None:
        report["inactive_units"] = _inactive_units(net, x)
    return report


@torch.no_grad()
def unused_inputs(net: nn.Module) -> int | None:
    """Input features (channels, for a CNN) that no weight of the first layer reads: all-zero
    slices along the input dimension of every input weight of the first weight layer (both
    directions of a bidirectional RNN, ``weight_ih_l0`` and ``weight_ih_l0_reverse``). None when
    the first weight layer is not Linear, Conv or RNN."""
    from hdl.sparsity import _weight_modules

    first = next(iter(_weight_modules(net)), None)
    if first is None:
        return None
    _, module, _ = first
    if isinstance(module, nn.RNNBase):
        names = [n for n in module._flat_weights_names if n.startswith("weight_ih_l0")]
    else:
        names = ["weight"]
    used = None
    for name in names:
        w = getattr(module, name)  # (out, in, ...): dimension 1 is the input
        reads = (w != 0).transpose(0, 1).reshape(w.shape[1], -1).any(dim=1)
        used = reads if used is None else used | reads
    return int((~used).sum())


@torch.no_grad()
def _inactive_units(net: nn.Module, x: Tensor) -> float:
    """Units (features or channels) whose activation output is 0 for every input in ``x``."""
    active: list[Tensor] = []

    def hook(_module: nn.Module, _inp: Any, out: Tensor) -> None:
        if isinstance(out, Tensor) and out.dim() >= 2:
            nonzero = out.detach() != 0
            dims = [0, *range(2, out.dim())]  # over examples and spatial positions
            active.append(nonzero.any(dim=dims) if len(dims) > 1 else nonzero.any(dim=0))

    hooks = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, ACTIVATIONS)]
    training = net.training
    try:
        net.eval()
        device = next(net.parameters()).device
        net(x.to(device))
    finally:
        net.train(training)
        for h in hooks:
            h.remove()
    return float(sum(int((~a).sum()) for a in active))


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
    run = load_run(path, device)
    data, module = run.data, run.module
    x, y = data.tensors["test"]
    if max_examples:
        x, y = x[:max_examples], y[:max_examples]
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
    report = {
        "run_dir": str(run.run_dir),
        "checkpoint": str(run.checkpoint),
        "task": task,
        "test_examples": len(y),
        "steps": steps,
        "square_queries": square_queries,
        "chance": chance,
        "chance_eps": large if task == "classification" else None,
        "robustness": results,
        "warnings": sanity_checks(results, task, len(y), chance, large),
        "sparsity": sparsity_report(module.net, x),
    }
    if write:
        (run.run_dir / "eval.json").write_text(json.dumps(report, indent=2))
    return report


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
