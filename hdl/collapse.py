"""Collapse detection: a classifier that predicts (nearly) one class, or is no better than
always predicting the majority class, is flagged, never hidden (metrics.json, the metrics
table, hdl-compare, hdl-select)."""

from __future__ import annotations

import numpy as np

CONCENTRATION = 0.95  # "nearly all one class": at least this share of the predictions


def collapse_flags(logits: np.ndarray, targets: np.ndarray, split: str) -> list[str]:
    """Flags for the predictions ``logits`` (N, C) of targets (N,) on ``split``; [] if healthy.

    - collapse: at least 95 % of the predictions are one class, more concentrated than the
      labels themselves;
    - no better than the majority: accuracy at or below the majority class's share.
    """
    logits, targets = np.asarray(logits), np.asarray(targets).astype(np.int64)
    if logits.ndim != 2 or len(targets) == 0:
        return []
    n, classes = len(targets), max(logits.shape[1], int(targets.max()) + 1)
    predicted = logits.argmax(axis=1)
    pred_counts = np.bincount(predicted, minlength=classes)
    true_counts = np.bincount(targets, minlength=classes)
    share, cls = pred_counts.max() / n, int(pred_counts.argmax())
    majority = true_counts.max() / n
    accuracy = float((predicted == targets).mean())
    flags = []
    if share >= CONCENTRATION and share > majority:
        flags.append(
            f"collapse ({split}): {share:.1%} of the predictions are class {cls} "
            f"(the labels: {true_counts[cls] / n:.1%})"
        )
    if accuracy <= majority:
        flags.append(
            f"collapse ({split}): accuracy {accuracy:.3f} is at or below the majority-class "
            f"share {majority:.3f}"
        )
    return flags
