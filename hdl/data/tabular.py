"""Tabular data: scikit-learn's shipped sets, any CSV with a label column, or a pair of
headerless feature/label CSV files (the format of the holistic-deep-learning paper's UCI sets)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hdl.data.base import ArrayDataModule, imbalance_examples, limit_examples
from hdl.errors import ConfigError, DataError

SKLEARN_SETS = ("iris", "wine", "breast_cancer", "digits")


def _read_csv(path: str | Path, key: str, header: bool) -> pd.DataFrame:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{key}: file not found: {path}")
    try:
        frame = pd.read_csv(path, header=0 if header else None)
    except pd.errors.EmptyDataError:
        raise DataError(f"{key}: file is empty: {path}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{key}: cannot parse {path}: {err}") from None
    if frame.empty:
        raise DataError(f"{key}: file has no data rows: {path}")
    return frame


def _numeric(frame: pd.DataFrame, key: str, path: str | Path) -> np.ndarray:
    bad = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if bad:
        raise DataError(f"{key}: non-numeric feature column {bad[0]!r} in {path}")
    values = frame.to_numpy(dtype=np.float32)
    if np.isnan(values).any():
        row = int(np.isnan(values).any(axis=1).argmax())
        raise DataError(f"{key}: missing or NaN feature value in {path} (data row {row + 1})")
    return values


class SklearnDataModule(ArrayDataModule):
    """A data set that ships with scikit-learn (no download): iris, wine, breast_cancer, digits."""

    def __init__(
        self,
        dataset: str = "wine",
        limit: int | None = None,
        imbalance: float | None = None,
        **kwargs,
    ) -> None:
        if dataset not in SKLEARN_SETS:
            raise ConfigError(
                f"data.dataset must be one of {', '.join(SKLEARN_SETS)}, got {dataset!r}"
            )
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 10
        ):
            raise ConfigError(f"data.limit must be an integer >= 10 or null, got {limit!r}")
        super().__init__(**kwargs)
        self.dataset, self.limit, self.imbalance = dataset, limit, imbalance

    @property
    def name(self) -> str:
        return self.dataset

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The set, made ``imbalance``:1 (binary) and then subsampled to ``limit`` rows
        (stratified), both fixed by ``data.seed``: small and imbalanced variants of shipped data."""
        import sklearn.datasets as sk

        bunch = getattr(sk, f"load_{self.dataset}")()
        x, y = imbalance_examples(bunch.data, bunch.target, self.imbalance, self.seed)
        return limit_examples(x, y, self.limit, self.seed)


class CSVDataModule(ArrayDataModule):
    """Any CSV file with a header and a label column; every other column is a numeric feature."""

    def __init__(self, path: str, label_column: str = "label", **kwargs) -> None:
        super().__init__(**kwargs)
        self.path = path
        self.label_column = label_column

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        frame = _read_csv(self.path, "data.path", header=True)
        if self.label_column not in frame.columns:
            raise DataError(
                f"data.label_column: column {self.label_column!r} not in {self.path} "
                f"(columns: {', '.join(map(str, frame.columns[:10]))})"
            )
        labels = frame.pop(self.label_column)
        if labels.isna().any():
            raise DataError(
                f"data.label_column: label {self.label_column!r} has NaN in {self.path}"
            )
        if frame.shape[1] == 0:
            raise DataError(f"data.path: {self.path} has no feature columns")
        return _numeric(frame, "data.path", self.path), labels.to_numpy()


class PairedCSVDataModule(ArrayDataModule):
    """Two headerless CSV files: one row of features per example, and one label per row."""

    def __init__(self, features_path: str, labels_path: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.features_path = features_path
        self.labels_path = labels_path

    @property
    def name(self) -> str:
        return Path(self.features_path).stem

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        x = _numeric(
            _read_csv(self.features_path, "data.features_path", header=False),
            "data.features_path",
            self.features_path,
        )
        labels = _read_csv(self.labels_path, "data.labels_path", header=False)
        if labels.shape[1] != 1:
            raise DataError(
                f"data.labels_path: expected one label column in {self.labels_path}, "
                f"found {labels.shape[1]}"
            )
        y = labels.iloc[:, 0]
        if y.isna().any():
            raise DataError(f"data.labels_path: NaN label in {self.labels_path}")
        if len(y) != len(x):
            raise DataError(
                f"data.labels_path: {len(y)} labels in {self.labels_path} but {len(x)} feature "
                f"rows in {self.features_path}"
            )
        return x, y.to_numpy()
