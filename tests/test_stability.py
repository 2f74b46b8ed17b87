"""Stability metrics across split seeds, on hand-made predictions with known answers."""

import math

import numpy as np
import pytest

from hdl.stability import gini_impurity, load_predictions, prediction_stability, weight_std


def test_gini_impurity_known_values():
    # 3 runs x 3 examples: all agree, all differ (3 classes), all agree
    predicted = np.array([[0, 0, 1], [0, 1, 1], [0, 2, 1]])
    assert gini_impurity(predicted).tolist() == pytest.approx([0.0, 2 / 3, 0.0])
    # two runs split evenly over two classes: 1 - 2 * (1/2)^2
    assert gini_impurity(np.array([[0], [1]]))[0] == pytest.approx(0.5)


def test_prediction_stability_classification():
    targets = np.array([0, 1, 1, 0])
    # run 0 gets all right, run 1 flips the last example
    logits = np.zeros((2, 4, 2))
    logits[0, [0, 3], 0] = 1.0
    logits[0, [1, 2], 1] = 1.0
    logits[1] = logits[0]
    logits[1, 3] = [0.0, 1.0]
    out = prediction_stability(logits, targets, "classification")
    assert out["acc_mean"] == pytest.approx(0.875)
    assert out["acc_std"] == pytest.approx(np.std([1.0, 0.75], ddof=1))
    assert out["acc_min"] == pytest.approx(0.75)
    assert out["gini"] == pytest.approx(0.5 / 4)  # one example of four has impurity 0.5
    # only example 3's two logits differ, each by 1 between the runs: std sqrt(0.5)
    assert out["logit_std"] == pytest.approx(2 * math.sqrt(0.5) / 8)


def test_identical_runs_are_perfectly_stable():
    rng = np.random.default_rng(0)
    logits = np.repeat(rng.normal(size=(1, 20, 3)), 4, axis=0)
    out = prediction_stability(logits, rng.integers(0, 3, 20), "classification")
    assert out["gini"] == 0.0 and out["logit_std"] == 0.0 and out["acc_std"] == 0.0


def test_prediction_stability_regression():
    targets = np.array([0.0, 1.0])
    preds = np.array([[0.0, 1.0], [1.0, 1.0]])
    out = prediction_stability(preds, targets, "regression")
    assert out["rmse_mean"] == pytest.approx((0.0 + math.sqrt(0.5)) / 2)
    assert out["rmse_max"] == pytest.approx(math.sqrt(0.5))
    assert out["prediction_std"] == pytest.approx(math.sqrt(0.5) / 2)


def test_weight_std():
    a = {"w": np.array([0.0, 2.0]), "b": np.array([1.0])}
    b = {"w": np.array([0.0, 4.0]), "b": np.array([1.0])}
    assert weight_std([a, b]) == pytest.approx(math.sqrt(2) / 3)
    assert weight_std([a]) is None
    assert weight_std([a, {"w": np.zeros(2)}]) is None  # different tensors: not comparable


def test_load_predictions_rejects_different_test_sets(tmp_path):
    np.savez(tmp_path / "a.npz", logits=np.zeros((3, 2)), targets=np.array([0, 1, 0]))
    np.savez(tmp_path / "b.npz", logits=np.ones((3, 2)), targets=np.array([0, 1, 0]))
    np.savez(tmp_path / "c.npz", logits=np.ones((3, 2)), targets=np.array([1, 1, 0]))
    logits, targets = load_predictions([tmp_path / "a.npz", tmp_path / "b.npz"])
    assert logits.shape == (2, 3, 2) and targets.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="targets differ"):
        load_predictions([tmp_path / "a.npz", tmp_path / "c.npz"])
