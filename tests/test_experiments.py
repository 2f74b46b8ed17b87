"""End-to-end: every experiment preset trains and writes metrics.json (tiny data and epochs),
and the L0 weight of the sparse term really sets how much is pruned."""

import json
import math
from pathlib import Path

import pytest

from hdl.runner import run
from tests.conftest import TINY, assert_robust_at_most_natural, compose

# the presets' own eval radii are kept (they are part of what is tested), only PGD is shortened
TINY_EXP = [o for o in TINY if not o.startswith("eval.eps=")]

# enough mask movement in a couple of tiny epochs that the hard round has something to prune
PRUNE_FAST = ["loss.sparse.mask_lr=0.02"]


def run_in_process(overrides: list[str], run_dir: Path) -> dict:
    cfg = compose(overrides, run_dir)
    run(cfg, run_dir)
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize(
    "experiment, data, model, loss, extra",
    [
        # 4 epochs: 2 per round of the presets' sparsity schedule (defined on steps)
        (
            "cnn_digits",
            "digits_images",
            "cnn",
            "holistic",
            ["data.limit=400", "trainer.max_epochs=4"],
        ),
        (
            "cnn_mnist",
            "mnist_subset",
            "cnn",
            "baseline",
            ["data.limit=200", "trainer.max_epochs=2"],
        ),
        (
            "rnn_digits",
            "digits_rows",
            "rnn",
            "holistic",
            ["data.limit=300", "trainer.max_epochs=4"],
        ),
    ],
)
def test_classification_experiment_presets(experiment, data, model, loss, extra, tmp_path):
    sparse = PRUNE_FAST if loss == "holistic" else []
    saved = run_in_process(
        [*TINY_EXP, f"experiment={experiment}", f"loss={loss}", *extra, *sparse], tmp_path
    )
    m = saved["metrics"]
    assert_robust_at_most_natural(m)
    cfg = saved["config"]
    assert cfg["data"]["name"] == data and cfg["model"]["name"] == model and saved["loss"] == loss
    assert list(cfg["eval"]["eps"]) == [0.05, 0.1]  # the preset's radii, on [0, 1] pixels
    keys = ["test/acc", "test/pgd_acc@0.05", "test/pgd_acc@0.1", "sparsity/zero_fraction"]
    assert set(keys) <= set(m), sorted(m)
    assert 0.0 <= m[keys[2]] <= m[keys[1]] + 1e-9 <= m["test/acc"] + 2e-9 <= 1.0 + 2e-9
    assert m["time/epoch_s"] > 0
    if loss == "baseline":
        assert m["sparsity/zero_fraction"] == 0.0
    else:  # every term of the composite loss was on, and the hard round pruned exact zeros
        assert {"train/robust", "train/theta", "train/l0"} <= set(m)
        assert 0.0 < m["sparsity/zero_fraction"] < 1.0


def test_rnn_sine_preset_trains_a_regressor(tmp_path):
    saved = run_in_process([*TINY_EXP, "experiment=rnn_sine", "data.n_samples=400"], tmp_path)
    m = saved["metrics"]
    cfg = saved["config"]
    assert cfg["data"]["name"] == "sine" and cfg["model"]["cell"] == "gru"
    keys = ["test/rmse", "test/pgd_rmse@0.1", "test/pgd_rmse@0.2", "test/mse"]
    assert set(keys) <= set(m), sorted(m)
    assert "test/acc" not in m
    assert math.isclose(m["test/rmse"] ** 2, m["test/mse"], rel_tol=1e-5)
    # the targets are standardised (std 1): a predictor that learned nothing has rmse ~1
    assert m["test/rmse"] < 0.8
    assert m["test/rmse"] <= m["test/pgd_rmse@0.1"] + 1e-6 <= m["test/pgd_rmse@0.2"] + 2e-6


def test_l0_weight_controls_sparsity(tmp_path):
    """Same seed, same data, three L0 weights a decade or more apart: the fraction of exact
    zeros must grow strictly with the weight, by a clear margin each time. With the old
    defaults (mask_init 0, kept logits clipped back to 0) noise alone pruned most weights
    whatever the weight, so the fractions were all high and close together."""
    fractions = []
    for i, l0 in enumerate([1e-3, 0.1, 1.0]):
        saved = run_in_process(
            [
                *TINY,
                "data=wine",
                "loss=sparse",
                "budget.steps=200",
                "eval.eps=[]",
                f"loss.sparse.l0={l0}",
            ],
            tmp_path / str(i),
        )
        fractions.append(saved["metrics"]["sparsity/zero_fraction"])
    low, mid, high = fractions
    assert low < 0.5, fractions  # without a real penalty most weights survive
    assert mid > low + 0.15 and high > mid + 0.15, fractions
