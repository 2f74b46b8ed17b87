"""The one vocabulary of l_p norms, shared by the loss (``loss.robust.norm``), the attacks
(``eval.norm``, ``hdl-eval --attacks pgd_l2``) and the metric keys.

Canonical names are ``"inf"``, ``"2"`` and ``"1"``. The robust loss supports all three (it uses
the dual norm of the input gradient); the attacks support ``"inf"`` and ``"2"`` (torchattacks has
no l_1 PGD). Each caller states which norms it accepts, so ``eval.norm=1`` is refused when the
config is validated, not after training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from hdl.errors import ConfigError

NORMS = ("inf", "2", "1")
LOSS_NORMS = NORMS
ATTACK_NORMS = ("inf", "2")
_ALIASES = {
    "inf": "inf",
    "linf": "inf",
    "l_inf": "inf",
    "infinity": "inf",
    "2": "2",
    "l2": "2",
    "l_2": "2",
    "1": "1",
    "l1": "1",
    "l_1": "1",
}
_VALUES = {"inf": math.inf, "2": 2.0, "1": 1.0}


def parse_norm(norm: Any, key: str = "norm", allowed: Sequence[str] = NORMS) -> str:
    """Canonical name of ``norm`` ("inf", "2" or "1") from "inf"/"linf"/"l2"/2/2.0/math.inf ...;
    a :class:`ConfigError` naming ``key`` when it is unknown or not in ``allowed``."""
    name = None
    if isinstance(norm, int | float) and not isinstance(norm, bool):
        name = {math.inf: "inf", 2.0: "2", 1.0: "1"}.get(float(norm))
    elif isinstance(norm, str):
        name = _ALIASES.get(norm.strip().lower())
    if name is None or name not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)} (an l_p norm), got {norm!r}")
    return name


def norm_value(norm: Any, key: str = "norm", allowed: Sequence[str] = NORMS) -> float:
    """p as a number (math.inf, 2.0 or 1.0)."""
    return _VALUES[parse_norm(norm, key, allowed)]
