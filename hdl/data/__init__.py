"""Data modules: every kind of data ends up as in-memory tensors batched by index."""

from hdl.data.base import ArrayDataModule

__all__ = ["ArrayDataModule"]
