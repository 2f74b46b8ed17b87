"""hdl.bounds: IBP and CROWN are sound against exhaustive and adversarial search, CROWN is at least
as tight as IBP, masks and batch norm are bounded as the forward pass computes them, and the
certified training loss (IBP, CROWN-IBP) composes with the other terms."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hdl.bounds import (
    certified_cross_entropy,
    crown_margins,
    ibp_margins,
    input_box,
    linearize,
    margin_spec,
    ramp,
    unstable_counts,
    worst_case_cross_entropy,
)
from hdl.errors import ConfigError
from hdl.losses import HolisticLoss
from hdl.models.cnn import CNN
from hdl.models.mlp import MLP
from hdl.sparsity import add_masks, masks, set_hard, strip_masks

TOL = 1e-5  # float32 round-off of the bounds


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These networks are tiny: one thread is faster, and immune to a busy second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def margins_at(model, spec, points):
    """Margins spec @ z of every point: points (N, B, *shape) -> (N, B, K)."""
    n, b = points.shape[:2]
    with torch.no_grad():
        z = model(points.reshape(n * b, *points.shape[2:])).reshape(n, b, -1)
    return torch.einsum("bko,nbo->nbk", spec, z)


def grid_2d(lower, upper, steps=81):
    """Every point of a steps x steps grid of each example's box (its 4 vertices included)."""
    t = torch.linspace(0, 1, steps)
    g = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)  # (S, 2)
    return lower[None] + (upper - lower)[None] * g[:, None, :]


def vertices(lower, upper):
    d = lower.shape[1]
    corners = torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)))
    return lower[None] + (upper - lower)[None] * corners[:, None, :]


def pgd_min_margin(model, spec, lower, upper, steps=60, restarts=3):
    """A strong attack on the smallest margin over the box (sign steps, random restarts)."""
    best = None
    for r in range(restarts):
        g = torch.Generator().manual_seed(r)
        x = lower + (upper - lower) * torch.rand(lower.shape, generator=g)
        step = (upper - lower) / 8
        for i in range(steps):
            x = x.detach().requires_grad_(True)
            m = torch.einsum("bko,bo->bk", spec, model(x)).amin(1)
            (grad,) = torch.autograd.grad(m.sum(), x)
            x = torch.min(torch.max(x - step * grad.sign(), lower), upper)
            if i == steps // 2:
                step = step / 4
        with torch.no_grad():
            m = torch.einsum("bko,bo->bk", spec, model(x))
        best = m if best is None else torch.minimum(best, m)
    return best


def trained_mlp(d_in, classes, hidden=(16, 16), seed=0, epochs=150):
    """A small ReLU MLP fitted to random blobs: margins of both signs near the data."""
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(classes, d_in, generator=g)
    y = torch.randint(0, classes, (300,), generator=g)
    x = centres[y] + 0.7 * torch.randn(300, d_in, generator=g)
    torch.manual_seed(seed)
    model = MLP((d_in,), classes, hidden=hidden)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x[:24], y[:24]


def both_bounds(model, x, y, eps, input_range=None, **kw):
    net = linearize(model, x.shape[1:])
    spec = margin_spec(y, net.ops[-1].out_shape[0])
    lower, upper = input_box(x, eps, input_range)
    with torch.no_grad():
        ibp = ibp_margins(net, lower, upper, spec)
        crown = crown_margins(net, lower, upper, spec, **kw)
    return spec, lower, upper, ibp, crown


# --- the network as a chain of operations ----------------------------------------------------
@pytest.mark.parametrize(
    "model, shape",
    [
        (MLP((5,), 3, hidden=(8, 8), dropout=0.2), (5,)),
        (
            CNN((1, 8, 8), 4, channels=(3, 4), hidden=(8,), normalize={"mean": 0.1, "std": 0.3}),
            (1, 8, 8),
        ),
        (
            CNN((1, 8, 8), 4, channels=(3, 4), hidden=(8,), pooling="avg", batch_norm=True),
            (1, 8, 8),
        ),
        (CNN((8, 8), 4, channels=(3,), kernel_size=2, hidden=(8,), pool_every=0), (8, 8)),
        (
            nn.Sequential(
                nn.Conv2d(2, 3, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Flatten(),
                nn.Identity(),
                nn.Linear(3 * 4 * 4, 5),
                nn.BatchNorm1d(5),
                nn.ReLU(),
                nn.Linear(5, 2),
            ),
            (2, 7, 7),
        ),
    ],
)
def test_chain_of_operations_computes_the_model(model, shape):
    for m in model.modules():  # non-trivial batch-norm statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.rand(5, *shape)
    net = linearize(model, shape)
    torch.testing.assert_close(net.forward(x), model(x), atol=1e-5, rtol=1e-5)
    # at eps = 0 both bounds are the margins themselves
    spec, lower, upper, ibp, crown = both_bounds(model, x, torch.zeros(5, dtype=torch.long), 0.0)
    exact = margins_at(model, spec, x[None])[0]
    torch.testing.assert_close(ibp, exact, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(crown.margins, exact, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.Conv2d(2, 4, 3, dilation=2, padding="same"),
        nn.Conv2d(2, 4, 4, padding="same"),  # even kernel: asymmetric padding
        nn.Conv2d(4, 6, 3, stride=(2, 1), groups=2),
    ],
)
def test_convolution_backward_pass_is_the_adjoint(conv):
    """<a, W x> = <a W, x>: the backward substitution through a convolution is exact."""
    c_in = conv.in_channels
    net = linearize(nn.Sequential(conv), (c_in, 9, 8))
    op = net.ops[0]
    x = torch.randn(3, c_in, 9, 8)
    a = torch.randn(3, 5, *op.out_shape)
    with torch.no_grad():
        lhs = (a * (op.apply(x) - conv.bias[:, None, None]).unsqueeze(1)).flatten(2).sum(-1)
        rhs = (op.transpose(a) * x.unsqueeze(1)).flatten(2).sum(-1)
    torch.testing.assert_close(lhs, rhs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(op.apply(x), conv(x), atol=1e-5, rtol=1e-5)


def test_unsupported_layers_are_refused_by_name():
    from hdl.models.rnn import RNN

    rnn = RNN((6, 4), 3)
    with pytest.raises(ConfigError, match="LSTM"):
        linearize(rnn, (6, 4))
    with pytest.raises(ConfigError, match=r"layer 1 \(Tanh\)"):
        linearize(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), (3,))
    with pytest.raises(ConfigError, match="batch statistics"):
        linearize(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train(), (3,))


def test_input_box_and_margin_spec():
    x = torch.tensor([[0.0, 0.5, 1.2]])  # 1.2: a clean input outside the range stays inside
    lower, upper = input_box(x, 0.1, (0.0, 1.0))
    torch.testing.assert_close(lower, torch.tensor([[0.0, 0.4, 1.1]]))
    torch.testing.assert_close(upper, torch.tensor([[0.1, 0.6, 1.2]]))
    spec = margin_spec(torch.tensor([2, 0]), 3)
    z = torch.tensor([1.0, 2.0, 5.0])
    assert (spec @ z).tolist() == [[4.0, 3.0], [-1.0, -4.0]]
    binary = margin_spec(torch.tensor([1, 0]), 1)  # one logit z: class logits [0, z]
    assert (binary @ torch.tensor([3.0])).flatten().tolist() == [3.0, -3.0]


# --- soundness -------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.05, 0.3, 1.0])
def test_two_input_network_bounds_hold_on_a_fine_grid(eps):
    model, x, y = trained_mlp(2, 3)
    spec, lower, upper, ibp, crown = both_bounds(model, x, y, eps)
    grid_min = margins_at(model, spec, grid_2d(lower, upper)).amin(0)  # (B, K)
    assert (ibp <= grid_min + TOL).all()
    assert (crown.margins <= grid_min + TOL).all()
    assert (crown.margins >= ibp - TOL).all()  # CROWN at least as tight as IBP
    # a certified point is never broken by the exhaustive search
    for bound in (ibp, crown.margins):
        certified = (bound > 0).all(1)
        assert (grid_min[certified] > 0).all()
    if eps == 0.3:  # informative: CROWN is strictly tighter somewhere, and certifies something
        assert (crown.margins > ibp + 1e-3).any()


def test_bounds_respect_the_input_box():
    model, x, y = trained_mlp(2, 3)
    x = x.sigmoid()  # inputs in (0, 1), the box [0, 1]
    spec, lower, upper, ibp, crown = both_bounds(model, x, y, 0.4, input_range=(0.0, 1.0))
    assert lower.min() >= 0 and upper.max() <= 1
    grid_min = margins_at(model, spec, grid_2d(lower, upper)).amin(0)
    assert (crown.margins <= grid_min + TOL).all() and (ibp <= grid_min + TOL).all()
    # the clipped box gives bounds at least as tight as the unbounded ball
    _, _, _, ibp_free, crown_free = both_bounds(model, x, y, 0.4)
    assert (ibp >= ibp_free - TOL).all() and (crown.margins >= crown_free.margins - TOL).all()


@pytest.mark.parametrize("eps", [0.1, 0.4])
def test_five_input_network_bounds_hold_against_vertices_samples_and_pgd(eps):
    model, x, y = trained_mlp(5, 4, hidden=(12, 12, 12), seed=1)
    spec, lower, upper, ibp, crown = both_bounds(model, x, y, eps)
    g = torch.Generator().manual_seed(0)
    samples = lower[None] + (upper - lower)[None] * torch.rand(2000, *lower.shape, generator=g)
    found = torch.cat(
        [margins_at(model, spec, samples), margins_at(model, spec, vertices(lower, upper))]
    )
    found = torch.minimum(found.amin(0), pgd_min_margin(model, spec, lower, upper))
    assert (ibp <= found + TOL).all() and (crown.margins <= found + TOL).all()
    assert (crown.margins >= ibp - TOL).all()
    pure = crown_margins(
        linearize(model, (5,)), lower, upper, spec, tighten_with_ibp=False
    ).margins.detach()
    assert (pure <= found + TOL).all()  # the back-substituted bound alone is sound too
    assert (
        crown.margins[(crown.margins > 0).all(1)] <= found[(crown.margins > 0).all(1)] + TOL
    ).all()
    assert not ((crown.margins > 0).all(1) & (found <= 0).any(1)).any()


@pytest.mark.parametrize("pooling, batch_norm", [("max", False), ("avg", True)])
def test_cnn_bounds_hold_against_samples_and_pgd(pooling, batch_norm):
    torch.manual_seed(0)
    model = CNN(
        (1, 6, 6),
        3,
        channels=(4, 4),
        hidden=(8,),
        pooling=pooling,
        batch_norm=batch_norm,
        pool_every=2,
        normalize={"mean": 0.5, "std": 0.25},
    )
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.rand(6, 1, 6, 6)
    y = torch.randint(0, 3, (6,))
    spec, lower, upper, ibp, crown = both_bounds(model, x, y, 0.05, input_range=(0.0, 1.0))
    flat_model = lambda v: model(v.reshape(-1, 1, 6, 6))  # noqa: E731
    lo, hi = lower.flatten(1), upper.flatten(1)
    samples = lo[None] + (hi - lo)[None] * torch.rand(500, *lo.shape)
    found = margins_at(flat_model, spec, samples).amin(0)
    found = torch.minimum(found, pgd_min_margin(flat_model, spec, lo, hi, steps=40, restarts=2))
    assert (ibp <= found + TOL).all() and (crown.margins <= found + TOL).all()
    assert (crown.margins >= ibp - TOL).all()
    counts = unstable_counts(linearize(model, (1, 6, 6)), crown.boxes)
    assert len(counts) == 3 and all(c.shape == (6,) for c in counts.values())  # three ReLUs


# --- the effective weights: masks and batch norm --------------------------------------------
def test_masked_network_is_bounded_with_its_effective_weights():
    model, x, y = trained_mlp(2, 3, hidden=(16, 16))
    add_masks(model, init=0.1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, mask in masks(model):
            mask.logits.copy_(torch.randn(mask.logits.shape, generator=g) + 0.3)
    set_hard(model)
    assert any((m.weight == 0).any() for m in model.modules() if isinstance(m, nn.Linear))
    spec, lower, upper, ibp, crown = both_bounds(model, x, y, 0.3)
    grid_min = margins_at(model, spec, grid_2d(lower, upper)).amin(0)
    assert (ibp <= grid_min + TOL).all() and (crown.margins <= grid_min + TOL).all()
    # identical to the bounds of the same network with the masks baked into plain weights
    plain = strip_masks(model)
    _, _, _, ibp_plain, crown_plain = both_bounds(plain, x, y, 0.3)
    torch.testing.assert_close(ibp, ibp_plain)
    torch.testing.assert_close(crown.margins, crown_plain.margins)


def test_batch_norm_is_folded_exactly():
    torch.manual_seed(0)
    model = MLP((2,), 3, hidden=(12, 12), batch_norm=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.3, 3.0)
                m.weight.normal_()
                m.bias.normal_()
    model.eval()
    x, y = torch.randn(16, 2), torch.randint(0, 3, (16,))
    spec, lower, upper, ibp, crown = both_bounds(model, x, y, 0.2)
    grid_min = margins_at(model, spec, grid_2d(lower, upper)).amin(0)
    assert (ibp <= grid_min + TOL).all() and (crown.margins <= grid_min + TOL).all()
    # a hand-folded copy (Linear with W * s, b * s + t) has the same bounds
    layers = []
    for m in [*model.body, model.head]:
        if isinstance(m, nn.BatchNorm1d):
            s = m.weight / torch.sqrt(m.running_var + m.eps)
            last = layers[-1]
            with torch.no_grad():
                last.weight.mul_(s[:, None])
                last.bias.copy_(last.bias * s + m.bias - m.running_mean * s)
        else:
            layers.append(
                nn.Linear(m.in_features, m.out_features) if isinstance(m, nn.Linear) else m
            )
            if isinstance(m, nn.Linear):
                layers[-1].load_state_dict(m.state_dict())
    folded = nn.Sequential(*layers).eval()
    _, _, _, ibp_f, crown_f = both_bounds(folded, x, y, 0.2)
    torch.testing.assert_close(ibp, ibp_f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(crown.margins, crown_f.margins, atol=1e-5, rtol=1e-5)


# --- certified training ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ibp", "crown_ibp"])
def test_certified_loss_is_at_least_natural_cross_entropy(method):
    model, x, y = trained_mlp(4, 3, epochs=30)
    for progress in (0.0, 0.5, 1.0):
        per, logits = certified_cross_entropy(
            model, x, y, eps=0.3, method=method, kappa=0.3, progress=progress
        )
        natural = F.cross_entropy(logits, y, reduction="none")
        assert per.shape == (len(y),)
        assert (per >= natural - 1e-5).all()
        if progress == 0.0:  # eps ramped to 0: the natural loss exactly
            torch.testing.assert_close(per, natural)
    # the worst-case CE of exact margins is the CE itself
    z = model(x)
    exact = torch.einsum("bko,bo->bk", margin_spec(y, 3), z)
    torch.testing.assert_close(
        worst_case_cross_entropy(exact), F.cross_entropy(z, y, reduction="none")
    )


def test_eps_ramp_counts_training_steps_only():
    assert ramp(0, 10) == 0.0 and ramp(5, 10) == 0.5 and ramp(50, 10) == 1.0 and ramp(3, 0) == 1.0
    loss = HolisticLoss(robust={"eps": 0.2, "method": "ibp", "ramp_steps": 4})
    model, x, y = trained_mlp(4, 3, epochs=5)
    loss.train()
    first = loss.compute(model, x, y)
    torch.testing.assert_close(first.terms["robust"], first.terms["ce"])  # eps 0 at step 0
    for _ in range(3):
        loss.compute(model, x, y)
    assert int(loss.cert_step) == 4
    loss.eval()
    loss.compute(model, x, y)
    assert int(loss.cert_step) == 4  # evaluation does not advance the ramp
    assert "cert_step" in loss.state_dict()  # resumed runs continue the ramp
    assert "cert_step" not in HolisticLoss(robust={"eps": 0.2}).state_dict()


@pytest.mark.parametrize(
    "robust, match",
    [
        ({"eps": 0.1, "method": "ibp", "norm": 2}, "loss.robust.norm"),
        ({"eps": 0.1, "method": "crown_ibp", "kappa": 1.5}, "loss.robust.kappa"),
        ({"eps": 0.1, "method": "ibp", "ramp_steps": -1}, "loss.robust.ramp_steps"),
        ({"eps": 0.1, "method": "crown"}, "loss.robust.method"),
    ],
)
def test_certified_config_is_checked(robust, match):
    with pytest.raises(ConfigError, match=match):
        HolisticLoss(robust=robust)


def test_certified_training_trains_a_tiny_problem_and_certifies():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (200,), generator=g)
    x = torch.randn(200, 2, generator=g) * 0.6 + (2 * y[:, None] - 1).float()
    results = {}
    for method in ("first_order", "ibp", "crown_ibp"):  # first_order at eps 0: plain CE
        torch.manual_seed(0)
        model = MLP((2,), 2, hidden=(16, 16))
        eps = 0.0 if method == "first_order" else 0.4
        loss = HolisticLoss(robust={"eps": eps, "method": method, "ramp_steps": 40, "kappa": 0.5})
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(80):
            opt.zero_grad()
            out = loss.compute(model, x, y)
            out.total.backward()
            opt.step()
        model.eval()
        spec, lower, upper, ibp, crown = both_bounds(model, x, y, 0.4)
        results[method] = float((ibp > 0).all(1).float().mean())
        assert float((model(x).argmax(1) == y).float().mean()) > 0.9
    assert results["ibp"] > 0.85 and results["crown_ibp"] > 0.85
    assert results["ibp"] > results["first_order"] + 0.1  # certified training certifies more


def test_certified_loss_composes_with_stable_and_sparse_terms():
    model = MLP((4,), 3, hidden=(8,))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    loss = HolisticLoss(
        robust={"eps": 0.1, "method": "crown_ibp"}, stable={"ratio": 0.5}, sparse={"l0": 1e-3}
    )
    add_masks(model, init=0.1)
    loss.train()
    out = loss.compute(model, x, y)
    assert {"ce", "robust", "stable", "theta", "l0", "total"} <= set(out.terms)
    out.total.backward()
    assert all(m.logits.grad is not None for _, m in masks(model))  # bounds go through the masks
    assert loss.theta.grad is not None
    per, _ = loss.per_example(model, x, y)
    from hdl.losses import stable_loss

    expected = stable_loss(per, loss.theta, 0.5) + 1e-3 * out.terms["l0"]
    torch.testing.assert_close(out.total, expected, atol=1e-5, rtol=1e-5)


def test_certified_loss_under_batch_norm_in_train_mode_uses_the_batch_statistics():
    torch.manual_seed(0)
    model = MLP((3,), 3, hidden=(8,), batch_norm=True).train()
    x, y = torch.randn(32, 3), torch.randint(0, 3, (32,))
    per, logits = certified_cross_entropy(model, x, y, eps=0.05)
    natural = F.cross_entropy(logits, y, reduction="none")
    assert (per >= natural - 1e-5).all()
    per.mean().backward()
    assert model.body[1].weight.grad is not None
