"""Stability of a model across runs that share a test set: how much it changes when only the
train/validation split (``data.split_seed``) or only the model-initialisation seed (``seed``)
does. :mod:`hdl.compare` keeps the two apart; the metrics here only see a set of runs.

Runs that differ only in ``data.split_seed`` and/or ``seed`` share the test set (it is fixed by
``data.seed``), so their test predictions can be compared example by example. For R runs, N test
examples and C classes (``logits`` of shape (R, N, C), ``targets`` of shape (N,)); every "std
across runs" is the sample std (ddof=1):

- ``acc_mean``, ``acc_std``, ``acc_min``: accuracy over the runs;
- ``gini``: Gini impurity of each example's predicted labels across the runs,
  ``1 - sum_c p_c^2`` with ``p_c`` the fraction of runs predicting class c (0: every run agrees),
  averaged over examples; unchanged when all logits are rescaled;
- ``logit_std``: std of the logits across runs, averaged over examples and classes. Not scale
  free: a network with smaller logits looks more stable;
- ``prob_std``: std of the softmax probabilities across runs, averaged over examples and classes.
  0 when the runs agree exactly; bounded, since probabilities lie in [0, 1]: at most
  ``0.5 * sqrt(R / (R - 1))`` (0.5 for the population std; the ddof=1 factor keeps it comparable
  with the other stds here). Only with C >= 2;
- ``margin_cv``: each example's signed margin in each run, ``z[c*] - max_{c != c*} z[c]`` with
  ``c*`` the example's majority-vote label over the runs (ties: the lowest class), whose std
  across runs is averaged over examples and divided by the mean absolute margin over all runs
  and examples. A ratio of averages, not an average of per-example ratios, so examples with a
  margin near 0 cannot blow it up; invariant when all logits of all runs are multiplied by one
  positive constant. Left out when the mean absolute margin is ~0 (below 1e-6 of the mean
  absolute logit, or 0) and for C < 2;

and for regression (``logits`` (R, N) or (R, N, 1) predictions):

- ``rmse_mean``, ``rmse_std``, ``rmse_max``: RMSE over the runs;
- ``prediction_std``: std of the predictions across runs, averaged over examples (in the
  targets' unit);
- ``prediction_std_rel``: ``prediction_std / std(targets)`` (population std of the test
  targets), scale free; left out when the targets are constant.

Weights (``weights.npz``, one mapping of name -> array per run; :func:`weight_stability`):

- ``weight_std``: std of each weight across runs, averaged over the weights that are non-zero in
  at least one run. A weight pruned in every run has std 0 and carries no information about
  stability; averaging it in would make a sparser network look more stable;
- ``weight_cv``: that ``weight_std`` divided by the mean ``|w|`` over the same entries and all
  runs (a ratio of averages): scale free, unchanged when every weight of every run is multiplied
  by one constant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def _std(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Sample std (ddof=1) across runs; 0 for a single run."""
    return (
        values.std(axis=axis, ddof=1)
        if values.shape[axis] > 1
        else np.zeros_like(values.mean(axis))
    )


def _label_counts(predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(R, N) predicted labels -> (N, C) how many runs predict each class."""
    counts = np.zeros((predicted.shape[1], num_classes))
    for run in predicted:  # R is small (a handful of runs); N and C are vectorised
        counts[np.arange(predicted.shape[1]), run] += 1
    return counts


def gini_impurity(predicted: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Per-example Gini impurity of labels ``predicted`` (R runs, N examples) -> (N,)."""
    predicted = np.asarray(predicted, dtype=np.int64)
    if predicted.ndim != 2:
        raise ValueError(f"predicted labels must be (runs, examples), got shape {predicted.shape}")
    c = int(num_classes or predicted.max() + 1)
    p = _label_counts(predicted, c) / predicted.shape[0]
    return 1.0 - (p**2).sum(axis=1)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def margin_cv(logits: np.ndarray) -> float | None:
    """Std across runs of each example's signed margin for its majority-vote label, averaged over
    examples, over the mean absolute margin (see the module docstring); None when undefined."""
    logits = np.asarray(logits, dtype=np.float64)
    runs, n, c = logits.shape
    if c < 2 or n == 0:
        return None
    predicted = logits.argmax(axis=2)
    consensus = _label_counts(predicted, c).argmax(axis=1)  # ties: the lowest class
    rows = np.arange(n)
    own = logits[:, rows, consensus]  # (R, N)
    others = logits.copy()
    others[:, rows, consensus] = -np.inf
    margins = own - others.max(axis=2)
    scale = float(np.abs(margins).mean())
    if not scale > 1e-6 * float(np.abs(logits).mean()):  # also 0 > 0: all logits are 0
        return None  # every margin is ~0: the ratio says nothing
    return float(_std(margins).mean() / scale)


def prediction_stability(logits: np.ndarray, targets: np.ndarray, task: str) -> dict[str, float]:
    """Accuracy (or RMSE) spread, label disagreement and output spread across R runs (the keys
    are described in the module docstring)."""
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets)
    runs = logits.shape[0]
    out: dict[str, float] = {"runs": float(runs)}
    if task == "classification":
        if logits.ndim != 3:
            raise ValueError(f"logits must be (runs, examples, classes), got {logits.shape}")
        predicted = logits.argmax(axis=2)
        acc = (predicted == targets[None, :]).mean(axis=1)
        out |= {
            "acc_mean": float(acc.mean()),
            "acc_std": float(_std(acc)),
            "acc_min": float(acc.min()),
            "gini": float(gini_impurity(predicted, logits.shape[2]).mean()),
            "logit_std": float(_std(logits).mean()),
        }
        if logits.shape[2] >= 2:
            out["prob_std"] = float(_std(softmax(logits, axis=2)).mean())
            cv = margin_cv(logits)
            if cv is not None:
                out["margin_cv"] = cv
    else:
        pred = logits.reshape(runs, -1)
        flat = targets.reshape(-1).astype(np.float64)
        rmse = np.sqrt(((pred - flat.reshape(1, -1)) ** 2).mean(axis=1))
        out |= {
            "rmse_mean": float(rmse.mean()),
            "rmse_std": float(_std(rmse)),
            "rmse_max": float(rmse.max()),
            "prediction_std": float(_std(pred).mean()),
        }
        spread = float(flat.std()) if flat.size else 0.0
        if spread > 1e-12 * max(float(np.abs(flat).max(initial=0.0)), 1e-300):
            out["prediction_std_rel"] = out["prediction_std"] / spread
    return out


def weight_stability(weights: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float] | None:
    """``weight_std`` and ``weight_cv`` across runs over the weights that are non-zero in at least
    one run (None with fewer than 2 runs, when the runs' tensors do not match, e.g. different
    architectures, or when every weight is zero in every run)."""
    if len(weights) < 2:
        return None
    names = sorted(weights[0])
    if any(sorted(w) != names for w in weights[1:]):
        return None
    std_sum, abs_sum, count = 0.0, 0.0, 0
    for name in names:
        arrays = [np.asarray(w[name], dtype=np.float64) for w in weights]
        if any(a.shape != arrays[0].shape for a in arrays[1:]):
            return None
        stack = np.stack(arrays).reshape(len(arrays), -1)
        used = (stack != 0).any(axis=0)  # pruned in every run: no information, left out
        if not used.any():
            continue
        stack = stack[:, used]
        std_sum += float(_std(stack).sum())
        abs_sum += float(np.abs(stack).mean(axis=0).sum())
        count += stack.shape[1]
    if not count:
        return None
    out = {"weight_std": std_sum / count}
    if abs_sum > 0:
        out["weight_cv"] = std_sum / abs_sum
    return out


def weight_std(weights: Sequence[Mapping[str, np.ndarray]]) -> float | None:
    """Mean std across runs of the weights that are non-zero in at least one run (see
    :func:`weight_stability`)."""
    out = weight_stability(weights)
    return None if out is None else out["weight_std"]


def load_predictions(paths: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Stack ``predictions.npz`` files of runs that share a test set -> (logits (R, N, ...), targets).

    Raises ``ValueError`` when the runs' test targets differ (a different ``data.seed`` or data
    set): their predictions are not comparable example by example.
    """
    logits, targets = [], None
    for path in paths:
        with np.load(path) as f:
            logits.append(f["logits"].astype(np.float32))
            t = f["targets"]
        if targets is None:
            targets = t
        elif t.shape != targets.shape or not np.array_equal(t, targets):
            raise ValueError(
                f"{path}: test targets differ from the first run's (another test split?)"
            )
    if targets is None:
        raise ValueError("no predictions to compare")
    return np.stack(logits), targets
