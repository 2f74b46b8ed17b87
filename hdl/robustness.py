"""Robustness of a trained network under the attack battery, and the sanity checks an honest
attack evaluation must pass (docs/evaluation.md). The library behind ``hdl-eval``.

- accuracy (RMSE for regression) per attack and radius, each radius attacked on its own, an
  example robust only when it is correct on the clean input too;
- sanity checks, reported beside the numbers rather than hidden (gradient masking is the classic
  false win of gradient-norm-regularised models): accuracy does not increase with eps; PGD is
  not weaker than FGSM; accuracy reaches chance at a large eps; the gradient-free Square attack
  does not beat PGD.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from hdl.attacks import EVAL_SQUARE_QUERIES
from hdl.errors import ConfigError
from hdl.keys import format_eps


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
