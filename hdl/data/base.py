"""The one data module every data kind shares: arrays in memory, fixed splits, batched by index.

Subclasses only implement :meth:`load_arrays` (features, targets). The test split is fixed by
``seed``; the train/validation split of the rest is drawn by ``split_seed`` (what stability
sweeps vary). Features are optionally standardised with statistics of the training split only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.model_selection import train_test_split

from hdl.errors import ConfigError, DataError


def limit_examples(
    x: np.ndarray, y: np.ndarray, limit: int | None, seed: int, stratify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """A subsample of ``limit`` examples (stratified by label when asked), fixed by ``seed``.

    ``None`` (or a limit of at least the data size) keeps everything.
    """
    if limit is None or int(limit) >= len(y):
        return x, y
    if int(limit) < 1:
        raise ConfigError(f"data.limit must be a positive integer or null, got {limit!r}")
    idx = np.arange(len(y))
    try:
        keep, _ = train_test_split(
            idx, train_size=int(limit), random_state=seed, stratify=y if stratify else None
        )
    except ValueError:  # too few examples per class to stratify: plain random subsample
        keep, _ = train_test_split(idx, train_size=int(limit), random_state=seed)
    keep = np.sort(keep)
    return x[keep], y[keep]


def imbalance_examples(
    x: np.ndarray, y: np.ndarray, ratio: float | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Binary labels made ``ratio``:1 (majority : minority) by keeping a random subset of the
    minority class, fixed by ``seed`` (a failure mode of holistic training to test against)."""
    if ratio is None:
        return x, y
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) != 2:
        raise ConfigError(f"data.imbalance needs two classes, got {len(classes)}")
    if not float(ratio) >= 1:
        raise ConfigError(f"data.imbalance must be >= 1 (majority : minority), got {ratio!r}")
    major, minor = classes[counts.argmax()], classes[counts.argmin()]
    keep_minor = max(int(round(counts.max() / float(ratio))), 2)
    minor_idx = np.flatnonzero(y == minor)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(minor_idx, size=min(keep_minor, len(minor_idx)), replace=False)
    keep = np.sort(np.concatenate([np.flatnonzero(y == major), chosen]))
    return x[keep], y[keep]


class IndexBatches:
    """An iterable of (x, y) mini-batches sliced from whole tensors by a (shuffled) index.

    It replaces a DataLoader with a per-example Python loop: small data sets live on the device
    and one batch is one indexing operation. Lightning moves each batch to the device as usual.
    Under DDP each rank takes an interleaved shard of the (commonly shuffled) index.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.rank, self.world_size = 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def _indices(self) -> torch.Tensor:
        n = len(self.y)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = torch.randperm(n, generator=g)
            self.epoch += 1
        else:
            idx = torch.arange(n)
        if self.world_size > 1:
            per_rank = math.ceil(n / self.world_size)
            idx = torch.cat(
                [idx, idx[: per_rank * self.world_size - n]]
            )  # pad like DistributedSampler
            idx = idx[self.rank :: self.world_size]
        return idx

    def __len__(self) -> int:
        n = math.ceil(len(self.y) / self.world_size)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._indices()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = idx[start : start + self.batch_size]
            if len(batch) == 0:
                break
            yield self.x[batch], self.y[batch]


class ArrayDataModule(pl.LightningDataModule):
    """Base data module; subclasses return ``(features, targets)`` arrays from :meth:`load_arrays`.

    Attributes available after :meth:`setup`: ``input_shape`` (shape of one example),
    ``num_outputs`` (classes, or 1 for regression), ``task`` and ``input_range`` (the valid
    input domain, ``None`` when unbounded, as for standardised features).
    """

    task: str = "classification"

    def __init__(
        self,
        batch_size: int = 64,
        test_size: float = 0.2,
        val_size: float = 0.2,
        seed: int = 0,
        split_seed: int = 0,
        standardize: bool = True,
        eval_batch_size: int = 1024,
        input_range: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"data.batch_size must be a positive integer, got {batch_size!r}")
        for key, frac in (("test_size", test_size), ("val_size", val_size)):
            if not 0.0 < float(frac) < 1.0:
                raise ConfigError(f"data.{key} must be in (0, 1), got {frac!r}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.test_size = float(test_size)
        self.val_size = float(val_size)
        self.seed = int(seed)
        self.split_seed = int(split_seed)
        self.standardize = standardize
        self.declared_range: tuple[float, float] | None = None
        if input_range is not None:
            try:
                lo, hi = (float(v) for v in input_range)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"data.input_range must be [lo, hi] or null, got {input_range!r}"
                ) from None
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ConfigError(f"data.input_range must have lo < hi, got {input_range!r}")
            self.declared_range = (lo, hi)
        self._prepared = False

    # --- to implement -------------------------------------------------------------------
    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Return all features (N, ...) and targets (N,) of the data set."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def input_range(self) -> tuple[float, float] | None:
        """Bounds of valid inputs after preprocessing, the box the attacks stay in (``None``:
        unbounded, as for standardised features). Unstandardised: the declared
        ``data.input_range``, else the min/max of the **training** rows (never the test rows:
        the test split must not shape the evaluation; a test input outside it is still its own
        ball's centre, see :func:`hdl.attacks.perturb`)."""
        return None if self.standardize else self._raw_range

    # --- shared machinery ---------------------------------------------------------------
    def _validate(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(x) == 0:
            raise DataError(f"{self.name}: the data set is empty")
        if len(x) != len(y):
            raise DataError(f"{self.name}: {len(x)} feature rows but {len(y)} targets")
        try:
            x = np.asarray(x, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise DataError(f"{self.name}: features are not numeric ({err})") from None
        if not np.isfinite(x).all():
            bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
            raise DataError(f"{self.name}: features contain NaN or infinite values in {bad} rows")
        y = np.asarray(y)
        if self.task == "classification":
            if y.dtype.kind == "f":
                if not np.isfinite(y).all():
                    raise DataError(f"{self.name}: labels contain NaN values")
                if not np.all(y == np.round(y)):
                    raise DataError(
                        f"{self.name}: labels are non-integer floats; a classification task "
                        "needs class labels (use a regression task for continuous targets)"
                    )
            classes, y = np.unique(y, return_inverse=True)  # map labels to 0..C-1
            if len(classes) < 2:
                raise DataError(f"{self.name}: labels hold a single class ({classes[0]!r})")
            self.classes = classes.tolist()
            y = y.astype(np.int64)
        else:
            try:
                y = y.astype(np.float32)
            except (TypeError, ValueError):
                raise DataError(f"{self.name}: regression targets are not numeric") from None
            if not np.isfinite(y).all():
                raise DataError(f"{self.name}: targets contain NaN or infinite values")
        return x, y

    def prepare_arrays(self) -> None:
        if self._prepared:
            return
        x, y = self._validate(*self.load_arrays())
        stratify = y if self.task == "classification" else None
        idx = np.arange(len(y))
        try:
            rest, test = train_test_split(
                idx, test_size=self.test_size, random_state=self.seed, stratify=stratify
            )
            train, val = train_test_split(
                rest,
                test_size=self.val_size,
                random_state=self.split_seed,
                stratify=None if stratify is None else y[rest],
            )
        except ValueError as err:
            raise DataError(f"{self.name}: cannot split {len(y)} examples ({err})") from None
        self._raw_range = self.declared_range or (float(x[train].min()), float(x[train].max()))
        if self.standardize:
            flat = x[train].reshape(len(train), -1)
            mean, std = flat.mean(0), flat.std(0)
            std[std < 1e-8] = 1.0
            x = ((x.reshape(len(x), -1) - mean) / std).reshape(x.shape).astype(np.float32)
        self.split_indices = {"train": train, "val": val, "test": test}
        self.tensors = {
            k: (torch.from_numpy(x[v]), torch.from_numpy(y[v]))
            for k, v in self.split_indices.items()
        }
        self.input_shape = tuple(x.shape[1:])
        self.num_outputs = int(y.max()) + 1 if self.task == "classification" else 1
        self._prepared = True

    def setup(self, stage: str | None = None) -> None:
        self.prepare_arrays()

    def _batches(self, split: str, train: bool) -> IndexBatches:
        x, y = self.tensors[split]
        batches = IndexBatches(
            x,
            y,
            self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            seed=self.split_seed * 1000 + self.seed,
        )
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            batches.shard(trainer.global_rank, trainer.world_size)
        if train and trainer is not None:
            batches.set_epoch(trainer.current_epoch)
        return batches

    def train_dataloader(self) -> IndexBatches:
        return self._batches("train", train=True)

    def val_dataloader(self) -> IndexBatches:
        return self._batches("val", train=False)

    def test_dataloader(self) -> IndexBatches:
        return self._batches("test", train=False)
