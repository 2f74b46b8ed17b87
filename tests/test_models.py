"""CNN and RNN: every preset in conf/model/ builds, runs forward and backward on tiny inputs."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torch.nn.utils import parametrize

from hdl.build import load_preset
from hdl.errors import ConfigError
from hdl.models.cnn import CNN, Normalize
from hdl.models.rnn import RNN, sequence_shape

CNN_PRESETS = ["cnn", "cnn_vgg3", "cnn_alexnet"]
RNN_PRESETS = ["rnn", "gru", "elman"]


def build(preset: str, input_shape, num_outputs: int, **overrides) -> nn.Module:
    """Instantiate a conf/model preset the way the trainer does (``name`` popped)."""
    node = load_preset("model", preset)
    assert node.pop("name") == preset
    node.update(overrides)
    return instantiate(node, input_shape=list(input_shape), num_outputs=num_outputs)


def forward_backward(model: nn.Module, x: torch.Tensor, num_outputs: int) -> torch.Tensor:
    out = model(x)
    assert out.shape == (len(x), num_outputs)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- CNN ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", CNN_PRESETS)
def test_cnn_presets_forward_backward(preset):
    model = build(preset, (1, 8, 8), 10, channels=[4, 8], hidden=[16])
    assert isinstance(model, CNN)
    forward_backward(model, torch.rand(3, 1, 8, 8), 10)


@pytest.mark.parametrize("preset", CNN_PRESETS)
def test_cnn_presets_as_shipped_on_mnist_shape(preset):
    model = build(preset, (1, 28, 28), 10)
    with torch.no_grad():
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_cnn_channel_free_inputs():
    # (H, W) input shape, and (B, H, W) batches for a (1, H, W) model: a channel is added
    for shape in [(8, 8), (1, 8, 8)]:
        model = CNN(shape, 3, channels=[4], hidden=[8])
        out = model(torch.rand(5, 8, 8))
        assert out.shape == (5, 3)
        x = torch.rand(5, 8, 8)
        assert torch.equal(model(x), model(x[:, None]))


def test_cnn_rgb_non_square_and_regression_head():
    model = CNN((3, 12, 10), 1, channels=[4, 4], pool_every=2, pooling="avg", hidden=[])
    assert model.feature_shape == (4, 6, 5)
    forward_backward(model, torch.rand(2, 3, 12, 10), 1)


def test_cnn_pooling_schedule():
    never = CNN((1, 8, 8), 2, channels=[2, 2, 2], pool_every=0)
    every_second = CNN((1, 8, 8), 2, channels=[2, 2, 2], pool_every=2)
    every = CNN((1, 8, 8), 2, channels=[2, 2, 2], pool_every=1)
    assert [m.feature_shape[1:] for m in (never, every_second, every)] == [(8, 8), (4, 4), (1, 1)]
    with pytest.raises(ConfigError, match="too many pooling stages"):
        CNN((1, 8, 8), 2, channels=[2, 2, 2, 2], pool_every=1)


def test_cnn_batch_norm_and_dropout():
    model = CNN((1, 8, 8), 4, channels=[4, 4], hidden=[8], batch_norm=True, dropout=0.5)
    kinds = {type(m) for m in model.modules()}
    assert {nn.BatchNorm2d, nn.BatchNorm1d, nn.Dropout} <= kinds
    model.train()
    forward_backward(model, torch.rand(6, 1, 8, 8), 4)
    model.eval()
    with torch.no_grad():
        x = torch.rand(1, 1, 8, 8)  # one example works in eval mode
        assert torch.equal(model(x), model(x))


def test_cnn_normalize_is_a_layer_inside_the_model():
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    plain = CNN((3, 8, 8), 5, channels=[4], hidden=[8])
    normed = CNN((3, 8, 8), 5, channels=[4], hidden=[8], normalize={"mean": mean, "std": std})
    normed.load_state_dict(plain.state_dict(), strict=False)
    assert isinstance(normed.normalize, Normalize)
    x = torch.rand(4, 3, 8, 8)
    manual = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(normed(x), plain(manual))
    # the statistics are buffers (saved, moved with the model), not trained parameters
    assert {"normalize.mean", "normalize.std"} <= set(normed.state_dict())
    assert not any(n.startswith("normalize") for n, _ in normed.named_parameters())
    scalar = CNN((3, 8, 8), 5, channels=[4], normalize={"mean": 0.5, "std": 0.5})
    assert scalar(x).shape == (4, 5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"input_shape": (64,)}, "input_shape"),
        ({"pooling": "median"}, "model.pooling"),
        ({"activation": "swish"}, "model.activation"),
        ({"normalize": {"mean": 0.5}}, "model.normalize"),
        ({"normalize": {"mean": [0.1, 0.2], "std": 1.0}}, "model.normalize.mean"),
        ({"normalize": {"mean": 0.1, "std": 0.0}}, "model.normalize.std"),
        ({"channels": [0]}, "model.channels"),
        ({"dropout": 1.0}, "model.dropout"),
    ],
)
def test_cnn_config_errors(kwargs, match):
    args = {"input_shape": (1, 8, 8), "num_outputs": 2} | kwargs
    with pytest.raises(ConfigError, match=match):
        CNN(**args)


# --- RNN ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", RNN_PRESETS)
def test_rnn_presets_forward_backward(preset):
    model = build(preset, (5, 3), 4, hidden_size=8)
    assert isinstance(model, RNN)
    forward_backward(model, torch.randn(2, 5, 3), 4)


@pytest.mark.parametrize("preset", RNN_PRESETS)
def test_rnn_presets_as_shipped_regression(preset):
    model = build(preset, (20, 1), 1)
    forward_backward(model, torch.randn(3, 20, 1), 1)


def test_rnn_input_shape_variants():
    assert sequence_shape((7,)) == (7, 1)
    assert sequence_shape((7, 2)) == (7, 2)
    assert sequence_shape((1, 8, 6)) == (8, 6)
    assert sequence_shape((3, 8, 6)) == (8, 18)
    # (B, T): one feature per step
    model = RNN((7,), 3, cell="gru", hidden_size=4)
    x = torch.randn(2, 7)
    torch.testing.assert_close(model(x), model(x[..., None]))
    # (B, 1, H, W) images: H steps (rows) of W features
    model = RNN((1, 8, 6), 10, cell="lstm", hidden_size=4)
    img = torch.rand(2, 1, 8, 6)
    torch.testing.assert_close(model(img), model(img[:, 0]))
    # (B, C, H, W): each row step carries the C channels' rows side by side
    model = RNN((3, 8, 6), 10, cell="rnn", hidden_size=4)
    img = torch.rand(2, 3, 8, 6)
    rows = torch.cat([img[:, c] for c in range(3)], dim=2)
    torch.testing.assert_close(model(img), model(rows))


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_rnn_last_state_is_the_final_hidden_state(cell, bidirectional):
    model = RNN((6, 2), 3, cell=cell, hidden_size=5, num_layers=2, bidirectional=bidirectional)
    model.head = nn.Identity()
    x = torch.randn(4, 6, 2)
    _, h = model.rnn(x)
    h_n = h[0] if cell == "lstm" else h  # (layers * directions, B, H)
    expected = torch.cat([h_n[-2], h_n[-1]], 1) if bidirectional else h_n[-1]
    torch.testing.assert_close(model(x), expected)


def test_rnn_mean_pooling_bidirectional_stacked_dropout():
    model = RNN(
        (6, 2),
        3,
        cell="lstm",
        hidden_size=5,
        num_layers=2,
        bidirectional=True,
        dropout=0.3,
        pooling="mean",
    )
    assert model.rnn.dropout == 0.3 and isinstance(model.dropout, nn.Dropout)
    assert model.head.in_features == 10
    forward_backward(model, torch.randn(4, 6, 2), 3)
    model.head = nn.Identity()
    model.eval()
    x = torch.randn(4, 6, 2)
    torch.testing.assert_close(model(x), model.rnn(x)[0].mean(1))
    single = RNN((6, 2), 3, num_layers=1, dropout=0.3)
    assert single.rnn.dropout == 0.0  # torch's inter-layer dropout needs 2+ layers


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"cell": "transformer"}, "model.cell"),
        ({"pooling": "max"}, "model.pooling"),
        ({"hidden_size": 0}, "model.hidden_size"),
        ({"num_layers": 0}, "model.num_layers"),
        ({"dropout": -0.1}, "model.dropout"),
        ({"cell": "rnn", "nonlinearity": "gelu"}, "model.nonlinearity"),
        ({"input_shape": (1, 2, 3, 4)}, "input_shape"),
    ],
)
def test_rnn_config_errors(kwargs, match):
    args = {"input_shape": (5, 2), "num_outputs": 2} | kwargs
    with pytest.raises(ConfigError, match=match):
        RNN(**args)


# --- masks through torch.nn.utils.parametrize ------------------------------------------------
class FixedMask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def weight_names(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [
        (module, name)
        for module in model.modules()
        for name, p in module.named_parameters(recurse=False)
        if name.startswith("weight") and p.dim() > 1
    ]


@pytest.mark.parametrize(
    "model, x",
    [
        (
            RNN((6, 3), 4, cell="lstm", hidden_size=5, num_layers=2, bidirectional=True),
            torch.randn(2, 6, 3),
        ),
        (RNN((6, 3), 4, cell="gru", hidden_size=5), torch.randn(2, 6, 3)),
        (RNN((6, 3), 4, cell="rnn", hidden_size=5), torch.randn(2, 6, 3)),
        (CNN((1, 8, 8), 4, channels=[4, 4], hidden=[8]), torch.rand(2, 1, 8, 8)),
    ],
)
def test_parametrized_masks_give_exact_zeros_and_train(model, x):
    targets = weight_names(model)
    if isinstance(model, RNN):
        names = {n for _, n in targets}
        assert any(n.startswith("weight_ih_l") for n in names)
        assert any(n.startswith("weight_hh_l") for n in names)
    before = model(x).detach()
    for module, name in targets:
        w = getattr(module, name)
        mask = (torch.rand_like(w) > 0.5).to(w.dtype)
        parametrize.register_parametrization(module, name, FixedMask(mask))
    for module, name in targets:  # the weights the forward pass uses are exactly zero there
        off = module.parametrizations[name][0].mask == 0
        assert torch.all(getattr(module, name)[off] == 0)
    out = model(x)
    assert not torch.allclose(out, before)  # the RNN really uses the masked weights
    out.square().sum().backward()
    for module, name in targets:
        original = module.parametrizations[name].original
        mask = module.parametrizations[name][0].mask
        assert original.grad is not None
        assert torch.all(original.grad[mask == 0] == 0)


@pytest.mark.skipif(importlib.util.find_spec("hdl.sparsity") is None, reason="no hdl.sparsity")
@pytest.mark.parametrize(
    "model, x",
    [
        (RNN((6, 3), 4, cell="lstm", hidden_size=5, bidirectional=True), torch.randn(2, 6, 3)),
        (RNN((6, 3), 4, cell="gru", hidden_size=5, num_layers=2), torch.randn(2, 6, 3)),
        (CNN((1, 8, 8), 4, channels=[4, 4], hidden=[8]), torch.rand(2, 1, 8, 8)),
    ],
)
def test_hdl_sparsity_hard_masks(model, x):
    from hdl import sparsity

    targets = weight_names(model)
    assert sparsity.add_masks(model) == len(targets)
    model(x).sum().backward()  # soft masks: everything trains
    for p in sparsity.mask_parameters(model):  # push about half of the mask logits below zero
        with torch.no_grad():
            p.copy_(torch.randn_like(p))
    sparsity.set_hard(model)
    fractions = sparsity.zero_fractions(model)
    assert fractions and 0.0 < max(float(v) for v in fractions.values()) <= 1.0
    for module, name in targets:  # about half of every weight tensor is now exactly zero
        assert 0 < int((getattr(module, name) == 0).sum()) < getattr(module, name).numel()
    out = model(x)
    assert out.shape == (2, 4) and torch.isfinite(out).all()


# --- the robust loss on CNN and RNN ----------------------------------------------------------
@pytest.mark.parametrize(
    "model, x",
    [
        (CNN((1, 8, 8), 4, channels=[4, 4], hidden=[8]), torch.rand(6, 1, 8, 8)),
        (RNN((6, 3), 4, cell="lstm", hidden_size=5, bidirectional=True), torch.randn(6, 6, 3)),
        (RNN((1, 8, 8), 4, cell="gru", hidden_size=5), torch.rand(6, 1, 8, 8)),
        (RNN((6, 3), 4, cell="rnn", hidden_size=5, pooling="mean"), torch.randn(6, 6, 3)),
    ],
)
def test_robust_cross_entropy_on_cnn_and_rnn(model, x):
    losses = pytest.importorskip("hdl.losses")
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    ce = F.cross_entropy(model(x), y, reduction="none")
    torch.testing.assert_close(losses.robust_cross_entropy(model, x, y, eps=0.0), ce)
    for top_k in (None, 1):
        robust = losses.robust_cross_entropy(model, x, y, eps=0.1, norm="inf", top_k=top_k)
        assert robust.shape == (6,)
        assert torch.all(robust >= ce - 1e-6)
    assert robust.mean() > ce.mean()
    # the term trains the network: second-order gradients reach every weight
    model.zero_grad()
    losses.robust_cross_entropy(model, x, y, eps=0.1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
