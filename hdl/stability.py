"""Stability across train/validation splits: how much a model changes when only the split does.

Runs that differ only in ``data.split_seed`` share the test set (it is fixed by ``data.seed``),
so their test predictions can be compared example by example. For R runs, N test examples and
C classes (``logits`` of shape (R, N, C), ``targets`` of shape (N,)):

- accuracy over runs: mean, std (ddof=1) and minimum;
- Gini impurity of each example's predicted labels across the runs, ``1 - sum_c p_c^2`` with
  ``p_c`` the fraction of runs predicting class c (0: every run agrees), averaged over examples;
- std of the logits across runs, averaged over examples and classes (for regression: of the
  predictions);
- std of each weight across runs, averaged over the weights (from ``weights.npz``).
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


def gini_impurity(predicted: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Per-example Gini impurity of labels ``predicted`` (R runs, N examples) -> (N,)."""
    predicted = np.asarray(predicted, dtype=np.int64)
    if predicted.ndim != 2:
        raise ValueError(f"predicted labels must be (runs, examples), got shape {predicted.shape}")
    c = int(num_classes or predicted.max() + 1)
    counts = np.zeros((predicted.shape[1], c))
    for run in predicted:  # R is small (a handful of splits); N and C are vectorised
        counts[np.arange(predicted.shape[1]), run] += 1
    p = counts / predicted.shape[0]
    return 1.0 - (p**2).sum(axis=1)


def prediction_stability(logits: np.ndarray, targets: np.ndarray, task: str) -> dict[str, float]:
    """Accuracy (or RMSE) spread, mean Gini impurity and mean logit std across R runs."""
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
    else:
        pred = logits.reshape(runs, -1)
        rmse = np.sqrt(((pred - targets.reshape(1, -1)) ** 2).mean(axis=1))
        out |= {
            "rmse_mean": float(rmse.mean()),
            "rmse_std": float(_std(rmse)),
            "rmse_max": float(rmse.max()),
            "prediction_std": float(_std(pred).mean()),
        }
    return out


def weight_std(weights: Sequence[Mapping[str, np.ndarray]]) -> float | None:
    """Mean over all weights of their std across runs (None with fewer than 2 runs or when the
    runs' tensors do not match, e.g. different architectures)."""
    if len(weights) < 2:
        return None
    names = sorted(weights[0])
    if any(sorted(w) != names for w in weights[1:]):
        return None
    total, count = 0.0, 0
    for name in names:
        stack = np.stack([np.asarray(w[name], dtype=np.float64) for w in weights])
        if stack.shape[1:] != np.asarray(weights[0][name]).shape:
            return None
        total += float(_std(stack).sum())
        count += stack[0].size
    return total / count if count else None


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
