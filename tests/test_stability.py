"""Stability metrics across runs, on hand-made predictions and weights with known answers."""

import math

import numpy as np
import pytest

from hdl.stability import (
    gini_impurity,
    load_predictions,
    prediction_stability,
    weight_stability,
    weight_std,
)


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
    assert out["prob_std"] == 0.0 and out["margin_cv"] == 0.0


def test_prediction_stability_regression():
    targets = np.array([0.0, 1.0])
    preds = np.array([[0.0, 1.0], [1.0, 1.0]])
    out = prediction_stability(preds, targets, "regression")
    assert out["rmse_mean"] == pytest.approx((0.0 + math.sqrt(0.5)) / 2)
    assert out["rmse_max"] == pytest.approx(math.sqrt(0.5))
    assert out["prediction_std"] == pytest.approx(math.sqrt(0.5) / 2)
    # scale free: over the targets' (population) std, 0.5
    assert out["prediction_std_rel"] == pytest.approx(math.sqrt(0.5))
    scaled = prediction_stability(7 * preds, 7 * targets, "regression")
    assert scaled["prediction_std"] == pytest.approx(7 * out["prediction_std"])
    assert scaled["prediction_std_rel"] == pytest.approx(out["prediction_std_rel"])
    assert "prediction_std_rel" not in prediction_stability(preds, np.ones(2), "regression")


def test_weight_std():
    a = {"w": np.array([0.0, 2.0]), "b": np.array([1.0])}
    b = {"w": np.array([0.0, 4.0]), "b": np.array([1.0])}
    # w[0] is zero in both runs (pruned): left out, so the mean is over w[1] and b only
    assert weight_std([a, b]) == pytest.approx(math.sqrt(2) / 2)
    assert weight_std([a]) is None
    assert weight_std([a, {"w": np.zeros(2)}]) is None  # different tensors: not comparable
    # mean |w| over the same entries: (2 + 4 + 1 + 1) / 4 = 2
    assert weight_stability([a, b])["weight_cv"] == pytest.approx((math.sqrt(2) / 2) / 2)


def test_weights_pruned_in_every_run_do_not_count():
    rng = np.random.default_rng(1)
    runs = [{"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3)} for _ in range(3)]
    base = weight_stability(runs)
    # a layer and a few entries that every run prunes: no information about stability
    padded = [
        {"w": np.pad(r["w"], ((0, 2), (0, 0))), "b": r["b"], "dead": np.zeros((5, 5))} for r in runs
    ]
    assert weight_stability(padded) == pytest.approx(base)
    # a weight that is zero in one run only still counts
    some = [dict(r) for r in runs]
    some[0] = {**runs[0], "b": np.array([0.0, *runs[0]["b"][1:]])}
    assert weight_stability(some)["weight_std"] != pytest.approx(base["weight_std"])
    assert weight_stability([{"w": np.zeros(3)}, {"w": np.zeros(3)}]) is None


def test_weight_cv_is_scale_free():
    rng = np.random.default_rng(2)
    runs = [{"w": rng.normal(size=(5, 4)), "b": rng.normal(size=4)} for _ in range(3)]
    scaled = [{k: 10.0 * v for k, v in r.items()} for r in runs]
    base, big = weight_stability(runs), weight_stability(scaled)
    assert big["weight_std"] == pytest.approx(10 * base["weight_std"])
    assert big["weight_cv"] == pytest.approx(base["weight_cv"])


def test_rescaled_logits_change_logit_std_but_not_labels_or_margin_cv():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 50, 3))
    targets = rng.integers(0, 3, 50)
    base = prediction_stability(logits, targets, "classification")
    big = prediction_stability(10 * logits, targets, "classification")
    assert big["logit_std"] == pytest.approx(10 * base["logit_std"])
    for key in ("gini", "acc_mean", "acc_std", "acc_min", "margin_cv"):
        assert big[key] == pytest.approx(base[key]), key
    runs = logits.shape[0]
    for out in (base, big):
        assert 0.0 < out["prob_std"] <= 0.5 * math.sqrt(runs / (runs - 1))
        assert out["margin_cv"] > 0


def test_prob_std_known_values_and_bound():
    # two runs, one example, two classes: probabilities (1/(1+e^-2), ...) vs the reverse
    logits = np.array([[[2.0, 0.0]], [[0.0, 2.0]]])
    p = 1 / (1 + math.exp(-2))
    out = prediction_stability(logits, np.array([0]), "classification")
    assert out["prob_std"] == pytest.approx(abs(2 * p - 1) / math.sqrt(2))
    # the most unstable two runs possible: one-hot outputs that disagree
    extreme = prediction_stability(1e4 * logits, np.array([0]), "classification")
    assert extreme["prob_std"] == pytest.approx(math.sqrt(0.5))  # 0.5 * sqrt(2 / 1)
    # signed margin of the majority label (ties: class 0): 2 and -2, std 2 sqrt(2), mean |m| 2
    assert out["margin_cv"] == pytest.approx(math.sqrt(2))


def test_margin_cv_is_left_out_when_every_margin_is_zero():
    out = prediction_stability(np.ones((3, 4, 2)), np.zeros(4, dtype=int), "classification")
    assert "margin_cv" not in out and out["prob_std"] == 0.0
    # one example with a near-zero margin among large ones cannot blow it up
    logits = np.repeat(np.array([[[5.0, 0.0], [0.0, 5.0], [1e-9, 0.0]]]), 3, axis=0)
    logits[1, 2] = [0.0, 1e-9]
    assert prediction_stability(logits, np.array([0, 1, 0]), "classification")["margin_cv"] < 1e-6


def test_load_predictions_rejects_different_test_sets(tmp_path):
    np.savez(tmp_path / "a.npz", logits=np.zeros((3, 2)), targets=np.array([0, 1, 0]))
    np.savez(tmp_path / "b.npz", logits=np.ones((3, 2)), targets=np.array([0, 1, 0]))
    np.savez(tmp_path / "c.npz", logits=np.ones((3, 2)), targets=np.array([1, 1, 0]))
    logits, targets = load_predictions([tmp_path / "a.npz", tmp_path / "b.npz"])
    assert logits.shape == (2, 3, 2) and targets.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="targets differ"):
        load_predictions([tmp_path / "a.npz", tmp_path / "c.npz"])
