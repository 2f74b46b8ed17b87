"""The ``eval`` config group as one validated object: what the test loop attacks, and how.

Validated when the config is (before anything trains), with one-line errors naming the key;
the module receives it whole.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from hdl.errors import ConfigError
from hdl.norms import ATTACK_NORMS, parse_norm


@dataclass(frozen=True)
class EvalConfig:
    eps: tuple[float, ...] = ()  # radii of the test-loop attack, in input units
    attack: str = "pgd"
    norm: str = "inf"
    steps: int = 40
    # the gradient-free Square attack at the largest eps (classification): when it beats PGD the
    # model masks gradients. Cheap in the test loop; hdl-eval runs 5,000 queries at every eps.
    square_check: bool = True
    square_queries: int = 1000

    @classmethod
    def from_mapping(cls, node: Mapping[str, Any] | None) -> EvalConfig:
        from hdl.attacks import ATTACKS

        values = dict(node or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"eval.{unknown[0]} is not a known key (known: {', '.join(sorted(known))})"
            )
        eps = values.get("eps", ())
        eps = [eps] if isinstance(eps, int | float | str) else list(eps)
        for value in eps:
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ConfigError(f"eval.eps must be a list of numbers >= 0, got {eps!r}")
        attack = values.get("attack", cls.attack)
        if attack not in ATTACKS:
            raise ConfigError(f"eval.attack must be one of {', '.join(ATTACKS)}, got {attack!r}")
        norm = parse_norm(values.get("norm", cls.norm), "eval.norm", ATTACK_NORMS)
        if norm not in ATTACKS[attack].norms:
            raise ConfigError(
                f"eval.norm={norm} is not supported by eval.attack={attack} "
                f"(norms: {', '.join(ATTACKS[attack].norms)})"
            )
        for key in ("steps", "square_queries"):
            value = values.get(key, getattr(cls, key))
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"eval.{key} must be a positive integer, got {value!r}")
        square = values.get("square_check", cls.square_check)
        if not isinstance(square, bool):
            raise ConfigError(f"eval.square_check must be true or false, got {square!r}")
        return cls(
            eps=tuple(float(e) for e in eps),
            attack=str(attack),
            norm=norm,
            steps=int(values.get("steps", cls.steps)),
            square_check=square,
            square_queries=int(values.get("square_queries", cls.square_queries)),
        )
