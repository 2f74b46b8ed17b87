"""The one home of metric keys under attack: ``<split>/<attack>_<kind>@<eps>``.

Examples: ``test/pgd_acc@0.1`` (the test loop), ``val/pgd_acc@0.1`` (the validation objective),
``eval/pgd_l2_acc@1.2`` and ``eval/fgsm_rs_linf_acc@0.1`` (``hdl-eval``, whose attack names carry
their norm). Every writer calls :func:`metric_key` and every reader :func:`parse_metric_key`, so
the two cannot drift apart (the tests round-trip every attack, norm and radius).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

KINDS = ("acc", "rmse", "mse")  # classification accuracy, regression errors
SPLITS = ("train", "val", "test", "eval")


class MetricKey(NamedTuple):
    split: str
    attack: str
    kind: str
    eps: float


def format_eps(eps: float) -> str:
    """The radius as written in keys and table headers (``0.1``, ``2``, ``1e-05``)."""
    return f"{float(eps):g}"


def metric_key(split: str, attack: str, kind: str, eps: float) -> str:
    if split not in SPLITS or kind not in KINDS or not attack or "@" in attack or "/" in attack:
        raise ValueError(f"bad metric key parts: {split!r}, {attack!r}, {kind!r}")
    if not math.isfinite(float(eps)) or float(eps) < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    return f"{split}/{attack}_{kind}@{format_eps(eps)}"


def parse_metric_key(key: str) -> MetricKey | None:
    """The parts of a key written by :func:`metric_key`, or None for any other key."""
    split, slash, rest = key.partition("/")
    name, at, eps_text = rest.rpartition("@")
    if not slash or not at or split not in SPLITS:
        return None
    try:
        eps = float(eps_text)
    except ValueError:
        return None
    for kind in KINDS:
        suffix = f"_{kind}"
        if name.endswith(suffix) and len(name) > len(suffix):
            return MetricKey(split, name[: -len(suffix)], kind, eps)
    return None


def natural_key(split: str, kind: str) -> str:
    """``test/acc``, ``val/mse`` ...: the metric on clean inputs."""
    return f"{split}/{kind}"


def attack_radii(keys: Iterable[str], split: str = "test") -> list[tuple[str, float]]:
    """The (attack, eps) pairs among ``keys`` measured under ``split`` (accuracy or RMSE keys;
    ``mse`` duplicates of RMSE are left out), sorted by attack then eps."""
    found = set()
    for key in keys:
        parsed = parse_metric_key(key)
        if parsed and parsed.split == split and parsed.kind != "mse":
            found.add((parsed.attack, parsed.eps))
    return sorted(found)
