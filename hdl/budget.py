"""The training budget (``budget``) and model selection (``select``) of a run, validated.

Budgets are counted in optimizer **steps** when ``budget.steps`` is set, so that a schedule
means the same on 300 rows and on 60,000 images: a 350-row training set at batch 64 gets about
6 steps per epoch, and an epoch budget that suits MNIST leaves it undertrained. Every variant of
a sweep gets the same budget: the minimum per sparsity round raises the budget from the
``loss.sparse.search_rounds`` that every loss preset carries (the schema in
``conf/loss/baseline.yaml``), whether or not the variant's sparsity term is on.

The evaluated model is chosen on validation (``select``): the best validation check, within the
final hard-mask round for sparse runs (docs/protocol.md). The test split never chooses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hdl.errors import ConfigError


def _positive_int(value: Any, key: str, allow_none: bool = False, minimum: int = 1) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        suffix = " or null" if allow_none else ""
        raise ConfigError(f"{key} must be an integer >= {minimum}{suffix}, got {value!r}")
    return value


@dataclass(frozen=True)
class Budget:
    steps: int | None = None  # total optimizer steps; None: trainer.max_epochs decides
    min_round_steps: int = 0  # at least this many steps per sparsity round
    val_checks: int = 25  # validations over a step budget: the candidate models for selection

    @classmethod
    def from_mapping(cls, node: Mapping[str, Any] | None) -> Budget:
        values = dict(node or {})
        unknown = sorted(set(values) - {"steps", "min_round_steps", "val_checks"})
        if unknown:
            raise ConfigError(
                f"budget.{unknown[0]} is not a known key (known: min_round_steps, steps, "
                "val_checks)"
            )
        return cls(
            steps=_positive_int(values.get("steps"), "budget.steps", allow_none=True),
            min_round_steps=_positive_int(
                values.get("min_round_steps", 0), "budget.min_round_steps", minimum=0
            ),
            val_checks=_positive_int(values.get("val_checks", cls.val_checks), "budget.val_checks"),
        )

    def total_steps(self, search_rounds: int) -> int | None:
        """The step budget, raised so that each of the ``search_rounds + 1`` sparsity rounds
        gets ``min_round_steps`` (the same for every variant of a sweep); None: epochs."""
        if self.steps is None:
            return None
        return max(self.steps, (int(search_rounds) + 1) * self.min_round_steps)

    def trainer_overrides(self, search_rounds: int) -> dict[str, Any]:
        """Trainer arguments of a step budget: max_steps, unlimited epochs, and validation every
        ``total / val_checks`` steps across epoch boundaries."""
        total = self.total_steps(search_rounds)
        if total is None:
            return {}
        return {
            "max_steps": total,
            "max_epochs": -1,
            "val_check_interval": max(total // self.val_checks, 1),
            "check_val_every_n_epoch": None,
        }


@dataclass(frozen=True)
class SelectConfig:
    monitor: str = "val/loss"  # a validation metric the module logs
    mode: str = "min"
    patience: int | None = None  # validation checks without improvement before stopping early

    @classmethod
    def from_mapping(cls, node: Mapping[str, Any] | None) -> SelectConfig:
        values = dict(node or {})
        unknown = sorted(set(values) - {"monitor", "mode", "patience"})
        if unknown:
            raise ConfigError(
                f"select.{unknown[0]} is not a known key (known: mode, monitor, patience)"
            )
        monitor = str(values.get("monitor", cls.monitor))
        if not monitor.startswith("val/"):
            raise ConfigError(
                f"select.monitor must be a validation metric (val/...), got {monitor!r}: "
                "the test split never chooses the model"
            )
        mode = values.get("mode", cls.mode)
        if mode not in ("min", "max"):
            raise ConfigError(f"select.mode must be min or max, got {mode!r}")
        patience = _positive_int(values.get("patience"), "select.patience", allow_none=True)
        return cls(monitor=monitor, mode=mode, patience=patience)
