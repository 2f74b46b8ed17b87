"""The training protocol: step budgets, selection on validation (never on test), collapse
flags, l0 that transfers across model sizes, smoke runs with the holistic preset."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from hdl.budget import Budget, SelectConfig
from hdl.collapse import collapse_flags
from hdl.errors import ConfigError
from hdl.selection import Candidate, choose, run_protocol, summarise, validation_view
from tests.conftest import TINY, compose


# --- budgets --------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["baseline", "robust", "sparse", "holistic", "pgd_at"])
def test_every_variant_of_a_sweep_gets_the_same_step_budget(loss, tmp_path):
    from hdl.build import trainer_settings

    cfg = compose([f"loss={loss}", "budget.steps=100", "budget.min_round_steps=80"], tmp_path)
    node, _ = trainer_settings(cfg)
    # raised to (search_rounds + 1) x 80 for every preset alike: they all carry search_rounds
    assert node["max_steps"] == 160 and node["max_epochs"] == -1
    assert node["val_check_interval"] == 160 // 25 and node["check_val_every_n_epoch"] is None


def test_epoch_configs_keep_working(tmp_path):
    from hdl.build import trainer_settings

    node, _ = trainer_settings(compose(["trainer.max_epochs=7"], tmp_path))
    assert node["max_epochs"] == 7 and "max_steps" not in node


@pytest.mark.parametrize(
    ("node", "key"),
    [
        ({"steps": 0}, "budget.steps"),
        ({"steps": 1.5}, "budget.steps"),
        ({"min_round_steps": -1}, "budget.min_round_steps"),
        ({"val_checks": 0}, "budget.val_checks"),
        ({"stepz": 10}, "budget.stepz"),
    ],
)
def test_budget_errors_name_the_key(node, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Budget.from_mapping(node)


def test_selection_must_monitor_validation():
    with pytest.raises(ConfigError, match="select.monitor"):
        SelectConfig.from_mapping({"monitor": "test/acc"})
    with pytest.raises(ConfigError, match="select.mode"):
        SelectConfig.from_mapping({"mode": "best"})


# --- l0 transfers across model sizes ---------------------------------------------------------------
def test_l0_penalty_is_a_mean_over_mask_entries():
    from hdl.sparsity import add_masks, l0_penalty, masks

    values = []
    for width in (8, 64, 512):
        net = nn.Sequential(nn.Linear(20, width), nn.ReLU(), nn.Linear(width, 3))
        add_masks(net, init=0.1)
        values.append(float(l0_penalty(net)))  # every mask is 1 at the start
        with torch.no_grad():  # prune half of every tensor: the penalty halves, any size
            for _, m in masks(net):
                m.logits.view(-1)[: m.logits.numel() // 2] = -50.0
        assert float(l0_penalty(net)) == pytest.approx(0.5, abs=0.02)
    assert values == pytest.approx([1.0, 1.0, 1.0])


# --- collapse -------------------------------------------------------------------------------------
def test_collapse_flags():
    targets = np.array([0] * 90 + [1] * 10)
    all_major = np.tile([5.0, 0.0], (100, 1))
    flags = collapse_flags(all_major, targets, "test")
    assert any("at or below the majority" in f for f in flags)
    good = np.stack([targets == 0, targets == 1], axis=1).astype(float)
    assert collapse_flags(good, targets, "test") == []
    balanced = np.array([0, 1] * 50)
    one_class = np.tile([0.0, 1.0], (100, 1))
    flags = collapse_flags(one_class, balanced, "val")
    assert any("100.0% of the predictions are class 1" in f for f in flags)
    assert all("(val)" in f for f in flags)


# --- selection on validation ----------------------------------------------------------------------
def _run(split: int, name: str, eps: float, l0: float, val: dict, test: dict, flags=()):
    config = {
        "data.name": "toy",
        "data.split_seed": split,
        "loss.name": name,
        "loss.robust.eps": eps,
        "loss.sparse.l0": l0,
        "eval.attack": "pgd",
    }
    return SimpleNamespace(config=config, metrics={**val, **test}, meta={"flags": list(flags)})


def _sweep(poison_test: bool = False) -> list:
    runs = []
    for split in range(3):
        t = (
            (lambda acc: {"test/acc": -1.0, "test/pgd_acc@0.1": 9.9})
            if poison_test
            else (lambda acc: {"test/acc": acc, "test/pgd_acc@0.1": acc - 0.1})
        )
        runs.append(
            _run(split, "baseline", 0, 0, {"val/acc": 0.95, "val/pgd_acc@0.1": 0.70}, t(0.95))
        )
        # the most robust on validation, but 3 points less accurate: outside the tolerance
        runs.append(
            _run(split, "holistic", 0.3, 0.1, {"val/acc": 0.92, "val/pgd_acc@0.1": 0.90}, t(0.9))
        )
        # within tolerance, the best val PGD accuracy: chosen
        runs.append(
            _run(
                split,
                "holistic",
                0.2,
                0.1,
                {"val/acc": 0.945, "val/pgd_acc@0.1": 0.85, "sparsity/zero_fraction": 0.7},
                t(0.94),
            )
        )
        # as robust on validation but less sparse: loses the tie
        runs.append(
            _run(
                split,
                "holistic",
                0.2,
                0.03,
                {"val/acc": 0.95, "val/pgd_acc@0.1": 0.85, "sparsity/zero_fraction": 0.4},
                t(0.99),
            )
        )
    return runs


def test_selection_chooses_on_validation_within_tolerance_ties_by_sparsity():
    protocol = run_protocol(_sweep())
    (results,) = protocol.values()
    assert [r.chosen for r in results] == ["holistic loss.robust.eps=0.2 loss.sparse.l0=0.1"] * 3


def test_selection_never_reads_test_metrics():
    clean = run_protocol(_sweep())
    poisoned = run_protocol(_sweep(poison_test=True))
    assert [r.chosen for r in next(iter(clean.values()))] == [
        r.chosen for r in next(iter(poisoned.values()))
    ]

    class NoTest(dict):
        def __getitem__(self, key):
            assert not key.startswith("test/"), key
            return super().__getitem__(key)

        def get(self, key, default=None):
            assert not key.startswith("test/"), key
            return super().get(key, default)

    base = Candidate("baseline", NoTest(validation_view({"val/acc": 0.9, "test/acc": 0.1})))
    grid = [Candidate("h", NoTest(validation_view({"val/acc": 0.9, "val/pgd_acc@0.1": 0.5})))]
    assert "test/acc" not in base.val
    chosen, _ = choose(base, grid)
    assert chosen.label == "h"


def test_selection_skips_val_collapse_and_falls_back_to_the_baseline():
    base = Candidate("baseline", {"val/acc": 0.9, "val/pgd_acc@0.1": 0.5})
    collapsed = Candidate("h", {"val/acc": 0.9, "val/pgd_acc@0.1": 0.9}, ["collapse (val): x"])
    worse = Candidate("h2", {"val/acc": 0.85, "val/pgd_acc@0.1": 0.9})
    chosen, reason = choose(base, [collapsed, worse])
    assert chosen is base and "no candidate" in reason


def test_summary_checks_the_targets():
    (results,) = run_protocol(_sweep()).values()
    s = summarise(results, "pgd", 0.1)
    assert s["targets"]["acc"] and s["targets"]["collapse"]
    assert s["targets"]["zeros"] and s["selected/zeros"][0] == pytest.approx(0.7)
    assert not s["targets"]["pgd"]  # 0.84 vs 0.85: not 5 points up
    assert math.isfinite(s["selected/acc"][0])


# --- end to end: a step budget, selection in the final round, smoke runs ------------------------
def test_step_budget_run_selects_in_the_final_round_and_records_it(tmp_path):
    from hdl.runner import run

    cfg = compose(
        [*TINY, "data=iris", "loss=holistic", "budget.steps=40", "budget.val_checks=8"], tmp_path
    )
    run(cfg, Path(tmp_path))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    chosen = saved["selected"]
    assert saved["global_step"] == 40 and saved["budget"]["steps"] == 40
    assert chosen["evaluated"] == "selected" and 20 <= chosen["step"] <= 40  # the hard round
    assert chosen["monitor"] == "val/loss" and "val/pgd_acc@0.1" in saved["metrics"]
    assert saved["metrics"]["val/pgd_acc@0.1"] <= saved["metrics"]["val/acc"] + 1e-9
    assert (tmp_path / "selected.ckpt").is_file()
    state = torch.load(tmp_path / "selected.ckpt", weights_only=False)
    assert state["selected"]["step"] == chosen["step"]
    assert isinstance(saved["flags"], list)


@pytest.mark.parametrize(
    "smoke", ["trainer.fast_dev_run=true", "trainer.max_epochs=1", "budget.steps=3"]
)
def test_holistic_smoke_runs_instead_of_refusing(smoke, tmp_path):
    """One epoch of iris (5 steps) holds both rounds; 1 or 3 steps do not: the schedule shrinks
    to the final round with a warning, and the run still finishes and writes its files."""
    import warnings

    from hdl.runner import run

    cfg = compose([*TINY, "data=iris", "loss=holistic", smoke], tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(cfg, Path(tmp_path))
    shrunk = [w for w in caught if "shrunk" in str(w.message)]
    assert bool(shrunk) == (smoke != "trainer.max_epochs=1")
    assert (tmp_path / "metrics.json").is_file()
