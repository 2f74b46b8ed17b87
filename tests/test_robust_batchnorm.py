"""The first-order robust term under batch norm in train mode (hdl.batchnorm).

Meaning: exact for each example's own function with the batch statistics held fixed. The mean
and variance are the batch's (they carry the weight gradient, the running statistics move
once), but an example's input gradient does not flow through them. The reference is a copy of
the model in eval mode whose running statistics are the batch's, run one example at a time.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hdl.batchnorm import combine_statistics, fixed_statistics, per_example_forward
from hdl.losses import HolisticLoss, robust_cross_entropy, robust_squared_error
from hdl.models.cnn import CNN
from hdl.models.mlp import MLP

DUAL = {"inf": 1, "2": 2}
EPS = 0.3


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster and does not stall when other work shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def conv1d_net():
    """BatchNorm1d on (B, C, L), non-affine and not tracking; then on (B, C), momentum None."""
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1),
        nn.BatchNorm1d(4, affine=False, track_running_stats=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(24, 8),
        nn.BatchNorm1d(8, momentum=None),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


MODELS = {
    # (constructor, one example's shape, classes)
    "mlp": (lambda: MLP((10,), 4, hidden=[16, 16], batch_norm=True), (10,), 4),
    "cnn": (lambda: CNN((1, 8, 8), 3, channels=[4, 8], hidden=[16], batch_norm=True), (1, 8, 8), 3),
    "conv1d": (conv1d_net, (2, 6), 3),
}


def make(name, batch):
    build, shape, classes = MODELS[name]
    model = build().train()
    with torch.no_grad():  # BN weights away from 1 / 0, so affine mistakes would show
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model, torch.randn(batch, *shape), torch.randint(0, classes, (batch,))


def batch_stats_copy(model, x):
    """A deep copy in eval mode whose BN layers normalise with the mean and biased variance of
    their input in a train-mode forward of the batch ``x``: each example's own function."""
    ref = copy.deepcopy(model).train()
    stats = {}

    def record(m, args):
        h = args[0]
        stats[m] = torch.var_mean(h, dim=[0, *range(2, h.dim())], correction=0)

    hooks = [
        m.register_forward_pre_hook(record) for m in ref.modules() if isinstance(m, _BatchNorm)
    ]
    with torch.no_grad():
        ref(x)
    for hook in hooks:
        hook.remove()
    for m, (var, mean) in stats.items():
        m.running_mean, m.running_var = mean.clone(), var.clone()
    return ref.eval()


def one_at_a_time(fn, model, x, y, *args):
    """``fn`` called with B = 1, once per example."""
    return torch.cat([fn(model, x[b : b + 1], y[b : b + 1], *args) for b in range(len(x))])


def naive_batched(model, x, y, eps, norm):
    """The old single-pass method: one train-mode forward, one batched VJP through the BN."""
    xg = x.detach().requires_grad_(True)
    return robust_cross_entropy(model, xg, y, eps, norm, logits=model(xg))


def rel_err(a, b):
    return ((a - b).abs() / b.abs()).max().item()


@pytest.mark.parametrize("batch", [8, 128])
@pytest.mark.parametrize("name", list(MODELS))
def test_robust_cross_entropy_is_per_example_exact(name, batch):
    model, x, y = make(name, batch)
    ref_model = batch_stats_copy(model, x)
    for norm in ("inf", "2"):
        got = robust_cross_entropy(copy.deepcopy(model), x, y, EPS, norm).detach()
        ref = one_at_a_time(robust_cross_entropy, ref_model, x, y, EPS, norm).detach()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        # teeth: the single-pass batched VJP mixes the examples' Jacobians through the BN
        old = naive_batched(copy.deepcopy(model), x, y, EPS, norm).detach()
        assert rel_err(old, ref) > 0.01, (norm, rel_err(old, ref))


def test_holistic_loss_classification_uses_per_example_term():
    model, x, y = make("cnn", 8)
    loss = HolisticLoss(robust={"eps": EPS, "norm": "2"})
    per, logits = loss.per_example(copy.deepcopy(model), x, y)
    expected = one_at_a_time(robust_cross_entropy, batch_stats_copy(model, x), x, y, EPS, "2")
    torch.testing.assert_close(per.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.detach(), copy.deepcopy(model)(x).detach())


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_robust_squared_error_is_per_example_exact(norm):
    model = MLP((10,), 1, hidden=[16, 16], batch_norm=True).train()
    x, y = torch.randn(16, 10), torch.randn(16)
    ref_model = batch_stats_copy(model, x)
    expected = one_at_a_time(robust_squared_error, ref_model, x, y, EPS, norm).detach()
    got = robust_squared_error(copy.deepcopy(model), x, y, EPS, norm).detach()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    loss = HolisticLoss(task="regression", robust={"eps": EPS, "norm": norm})
    per, _ = loss.per_example(copy.deepcopy(model), x, y)
    torch.testing.assert_close(per.detach(), expected, rtol=1e-5, atol=1e-6)
    # teeth: the old single pass (one train-mode forward, gradient through the BN) differs
    xg = x.detach().requires_grad_(True)
    pred = copy.deepcopy(model)(xg).reshape(-1)
    (grad,) = torch.autograd.grad(pred.sum(), xg)
    old = ((y - pred).abs() + EPS * torch.linalg.vector_norm(grad, ord=DUAL[norm], dim=1)) ** 2
    assert rel_err(old.detach(), expected) > 0.01


def reference_mlp_robust_ce(model, x, y, eps, norm, detach_stats=False):
    """Written out for an MLP: batch statistics of the train-mode forward as functions of the
    weights (``x`` constant), then per example and class one autograd call through the
    example's own function with those statistics."""
    layers = [*model.body, model.head]
    stats, h = [], x.flatten(1)
    for layer in layers:
        if isinstance(layer, nn.BatchNorm1d):
            var, mean = torch.var_mean(h, dim=0, correction=0)
            stats.append((mean.detach(), var.detach()) if detach_stats else (mean, var))
            h = F.batch_norm(h, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
        else:
            h = layer(h)

    def own_function(xb):
        h, fixed = xb, iter(stats)
        for layer in layers:
            if isinstance(layer, nn.BatchNorm1d):
                mean, var = next(fixed)
                h = (h - mean) / torch.sqrt(var + layer.eps) * layer.weight + layer.bias
            else:
                h = layer(h)
        return h[0]

    losses = []
    for b in range(len(x)):
        xb = x[b : b + 1].clone().requires_grad_(True)
        z = own_function(xb)
        terms = []
        for i in range(len(z)):
            d = z[i] - z[y[b]]
            if i != y[b]:
                (g,) = torch.autograd.grad(d, xb, create_graph=True)
                d = d + eps * torch.linalg.vector_norm(g.flatten(), ord=DUAL[norm])
            terms.append(d)
        losses.append(torch.logsumexp(torch.stack(terms), 0))
    return torch.stack(losses)


def weight_grads(model, loss_fn):
    model.zero_grad()
    loss_fn(model).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_weight_gradient_flows_through_batch_statistics(norm):
    model, x, y = make("mlp", 8)
    got = weight_grads(copy.deepcopy(model), lambda m: robust_cross_entropy(m, x, y, EPS, norm))
    expected = weight_grads(
        copy.deepcopy(model), lambda m: reference_mlp_robust_ce(m, x, y, EPS, norm)
    )
    for name in expected:
        assert torch.isfinite(got[name]).all()
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    # the statistics' path matters: with them detached the first layer's gradient differs
    detached = weight_grads(
        copy.deepcopy(model), lambda m: reference_mlp_robust_ce(m, x, y, EPS, norm, True)
    )
    assert rel_err(detached["body.0.weight"], expected["body.0.weight"]) > 0.01


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_natural_logits_and_weight_gradient_as_an_ordinary_forward(name):
    model, x, y = make(name, 8)
    ordinary = copy.deepcopy(model)
    xg = x.clone().requires_grad_(True)
    got = weight_grads(model, lambda m: F.cross_entropy(per_example_forward(m, xg), y))
    expected = weight_grads(ordinary, lambda m: F.cross_entropy(m(x), y))
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)


def bn_buffers(model):
    return {
        n: b.clone()
        for n, b in model.named_buffers()
        if n.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
    }


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("name", ["mlp", "cnn", "conv1d"])
def test_running_statistics_move_as_after_one_forward(name, momentum):
    model, x, y = make(name, 8)
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.momentum is not None:
            m.momentum = momentum
    ordinary = copy.deepcopy(model)
    with torch.no_grad():
        ordinary(x)
    expected = bn_buffers(ordinary)
    assert expected and all(int(v) == 1 for k, v in expected.items() if "tracked" in k)
    runs = {
        "robust_ce": lambda m: robust_cross_entropy(m, x, y, EPS),
        "holistic": lambda m: HolisticLoss(robust={"eps": EPS})(m, x, y)[0],
    }
    for label, run in runs.items():
        m = copy.deepcopy(model)
        run(m).sum().backward()
        got = bn_buffers(m)
        for key in expected:
            assert torch.equal(got[key], expected[key]), (label, key)
        assert all("forward" not in mod.__dict__ for mod in m.modules())


def test_regression_running_statistics_move_once():
    model = MLP((10,), 1, hidden=[16], batch_norm=True).train()
    x, y = torch.randn(8, 10), torch.randn(8)
    ordinary = copy.deepcopy(model)
    with torch.no_grad():
        ordinary(x)
    for run in (
        lambda m: robust_squared_error(m, x, y, EPS),
        lambda m: HolisticLoss(task="regression", robust={"eps": EPS})(m, x, y)[0],
    ):
        m = copy.deepcopy(model)
        run(m).sum().backward()
        got, expected = bn_buffers(m), bn_buffers(ordinary)
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def count_forwards(model):
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(1))
    return calls


@pytest.mark.parametrize("kind", ["no_bn", "bn_eval"])
def test_without_batch_statistics_it_is_the_plain_forward(kind):
    """No BN, or BN in eval mode with running statistics: one forward, bit for bit as before."""
    if kind == "no_bn":
        model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4)).train()
        reg = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1)).train()
    else:
        model, _, _ = make("mlp", 8)
        reg = MLP((10,), 1, hidden=[16], batch_norm=True).train()
        with torch.no_grad():  # some running statistics
            model(torch.randn(32, 10))
            reg(torch.randn(32, 10))
        model.eval(), reg.eval()
    x, y, t = torch.randn(8, 10), torch.randint(0, 4, (8,)), torch.randn(8)
    before = bn_buffers(model)
    calls = count_forwards(model)
    assert torch.equal(per_example_forward(model, x), model(x))
    assert len(calls) == 2
    for norm in ("inf", "2"):
        got = robust_cross_entropy(model, x, y, EPS, norm)
        assert torch.equal(got, naive_batched(model, x, y, EPS, norm))
        per, _ = HolisticLoss(robust={"eps": EPS, "norm": norm}).per_example(model, x, y)
        assert torch.equal(per, got)
    xg = x.detach().requires_grad_(True)
    pred = reg(xg).reshape(-1)
    (grad,) = torch.autograd.grad(pred.sum(), xg, create_graph=True)
    plain = ((t - pred).abs() + EPS * grad.abs().sum(1)) ** 2
    assert torch.equal(robust_squared_error(reg, x, t, EPS), plain)
    per, _ = HolisticLoss(task="regression", robust={"eps": EPS}).per_example(reg, x, t)
    assert torch.equal(per, plain)
    assert all(torch.equal(v, bn_buffers(model)[k]) for k, v in before.items())


def test_dropout_masks_are_shared_by_the_two_passes():
    model = MLP((10,), 4, hidden=[16, 16], batch_norm=True, dropout=0.5).train()
    ordinary = copy.deepcopy(model)
    x = torch.randn(8, 10)
    torch.manual_seed(1)
    expected = ordinary(x)
    state = torch.get_rng_state()
    torch.manual_seed(1)
    got = per_example_forward(model, x.requires_grad_(True))
    torch.testing.assert_close(got, expected)
    assert torch.equal(torch.get_rng_state(), state)  # the random state moved as in one forward


def test_layers_are_restored_after_an_error():
    model, x, y = make("mlp", 8)

    class Boom(nn.Module):
        calls = 0

        def forward(self, h):
            Boom.calls += 1
            if Boom.calls == 2:  # the second pass
                raise RuntimeError("boom")
            return h

    model.head = nn.Sequential(Boom(), model.head)
    with pytest.raises(RuntimeError, match="boom"):
        robust_cross_entropy(model, x, y, EPS)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert bns and all("forward" not in m.__dict__ and not m._forward_pre_hooks for m in bns)
    with torch.no_grad():
        model.eval()(x)  # the layers work as before (no recorded statistics left over)


def test_fixed_statistics_refuses_a_different_number_of_calls():
    bn = nn.BatchNorm1d(3)
    stats = {bn: [(torch.zeros(3), torch.ones(3))]}
    with pytest.raises(RuntimeError, match="more often"), fixed_statistics(stats):
        bn(torch.randn(4, 3))
        bn(torch.randn(4, 3))
    assert "forward" not in bn.__dict__
    with pytest.raises(RuntimeError, match="less often"), fixed_statistics(stats):
        pass


def test_combine_statistics_is_that_of_the_union():
    """SyncBatchNorm across processes: the global batch's statistics from every part's own."""
    parts = [torch.randn(n, 5) * 3 + 1 for n in (3, 7, 1)]
    var_means = [torch.var_mean(p, dim=0, correction=0) for p in parts]
    mean, var = combine_statistics(
        torch.stack([m for _, m in var_means]),
        torch.stack([v for v, _ in var_means]),
        torch.tensor([[3.0], [7.0], [1.0]]),
    )
    full_var, full_mean = torch.var_mean(torch.cat(parts), dim=0, correction=0)
    torch.testing.assert_close(mean, full_mean)
    torch.testing.assert_close(var, full_var)


def test_penalty_is_finite_and_exact_for_a_single_class_batch():
    """All examples of one class and B = 2, the smallest batch a train-mode BN accepts."""
    model, x, _ = make("mlp", 2)
    y = torch.zeros(2, dtype=torch.long)
    got = robust_cross_entropy(copy.deepcopy(model), x, y, EPS, "2")
    expected = one_at_a_time(robust_cross_entropy, batch_stats_copy(model, x), x, y, EPS, "2")
    torch.testing.assert_close(got.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    assert math.isfinite(got.sum().item())
