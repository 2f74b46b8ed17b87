"""Network architectures. Each maps a batch of inputs to logits (or to predictions for
regression) and is built from ``input_shape`` (one example) and ``num_outputs``; the training
step and the loss know nothing about them."""

from hdl.models.mlp import MLP

__all__ = ["MLP"]
