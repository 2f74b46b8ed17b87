"""Math of the composite loss: each term against its definition and a brute-force reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hdl.errors import ConfigError
from hdl.losses import HolisticLoss, robust_cross_entropy, robust_squared_error, stable_loss

DUAL = {"inf": 1, "2": 2, "1": math.inf}


def small_net(d_in=5, classes=4):
    return nn.Sequential(nn.Linear(d_in, 16), nn.Tanh(), nn.Linear(16, classes))


def brute_force_robust_ce(model, x, y, eps, norm):
    """One autograd call per example and class: the definition, with no batching tricks."""
    x = x.clone().requires_grad_(True)
    z = model(x)
    losses = []
    for b in range(len(x)):
        terms = []
        for i in range(z.shape[1]):
            d = z[b, i] - z[b, y[b]]
            (g,) = torch.autograd.grad(d, x, retain_graph=True)
            terms.append(d + eps * torch.linalg.vector_norm(g[b].flatten(), ord=DUAL[norm]))
        losses.append(torch.logsumexp(torch.stack(terms), 0))
    return torch.stack(losses)


@pytest.fixture
def batch():
    x = torch.randn(12, 5)
    y = torch.randint(0, 4, (12,))
    return small_net(), x, y


def test_robust_equals_cross_entropy_at_zero_eps(batch):
    net, x, y = batch
    expected = F.cross_entropy(net(x), y, reduction="none")
    assert torch.equal(robust_cross_entropy(net, x, y, 0.0), expected)


@pytest.mark.parametrize("norm", ["inf", "2", "1"])
def test_robust_matches_brute_force_dual_norm(batch, norm):
    net, x, y = batch
    got = robust_cross_entropy(net, x, y, 0.1, norm)
    torch.testing.assert_close(
        got, brute_force_robust_ce(net, x, y, 0.1, norm), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("norm", ["inf", "2", "1"])
def test_robust_is_monotone_in_eps_and_above_ce(batch, norm):
    net, x, y = batch
    ce = F.cross_entropy(net(x), y, reduction="none")
    previous = ce
    for eps in (0.01, 0.05, 0.2, 1.0):
        current = robust_cross_entropy(net, x, y, eps, norm)
        assert (current >= previous - 1e-6).all()
        assert (current > ce).all()
        previous = current


def test_robust_gradient_reaches_weights(batch):
    net, x, y = batch
    robust_cross_entropy(net, x, y, 0.1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_robust_ce_exceeds_cross_entropy_at_a_real_perturbation(batch):
    """For a linear model the first-order bound is exact: no l_inf perturbation beats it."""
    net = nn.Linear(5, 3)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    bound = robust_cross_entropy(net, x, y, 0.1, "inf")
    for _ in range(20):
        delta = (torch.rand_like(x) * 2 - 1) * 0.1
        assert (F.cross_entropy(net(x + delta), y, reduction="none") <= bound + 1e-5).all()


def test_top_k_is_between_ce_and_exact(batch):
    net, x, y = batch
    ce = F.cross_entropy(net(x), y, reduction="none")
    exact = robust_cross_entropy(net, x, y, 0.1)
    for k in (1, 2):
        approx = robust_cross_entropy(net, x, y, 0.1, top_k=k)
        assert (approx >= ce - 1e-6).all() and (approx <= exact + 1e-6).all()
    torch.testing.assert_close(robust_cross_entropy(net, x, y, 0.1, top_k=3), exact)


def test_robust_squared_error_bounds_regression():
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(10, 3), torch.randn(10)
    plain = (net(x).squeeze(1) - y).pow(2)
    assert torch.allclose(robust_squared_error(net, x, y, 0.0), plain)
    assert (robust_squared_error(net, x, y, 0.1) >= plain).all()


def test_stable_loss_at_optimal_theta_is_mean_of_top_losses():
    losses = torch.tensor([0.1, 2.0, 0.5, 1.5, 3.0, 0.2, 0.9, 1.1, 0.05, 2.5])
    for ratio in (0.1, 0.3, 0.5, 0.8, 1.0):
        k = math.ceil(ratio * len(losses))
        top = losses.sort(descending=True).values[:k].mean()
        # the optimum of the LP is attained at theta = the k-th largest loss
        theta = losses.sort(descending=True).values[k - 1]
        assert torch.isclose(stable_loss(losses, theta, ratio), top)
        # and every other theta gives an upper bound
        for t in torch.linspace(-1, 4, 51):
            assert stable_loss(losses, t, ratio) >= top - 1e-6


def test_stable_loss_theta_learns_to_the_optimum():
    losses = torch.rand(40) * 3
    theta = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([theta], lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        stable_loss(losses, theta, 0.25).backward()
        opt.step()
    top = losses.sort(descending=True).values[:10].mean()
    assert abs(stable_loss(losses, theta.detach(), 0.25).item() - top.item()) < 0.02


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_stable_loss_rejects_bad_ratio(ratio):
    with pytest.raises(ConfigError, match="ratio"):
        stable_loss(torch.ones(3), torch.zeros(()), ratio)


def test_baseline_is_plain_cross_entropy_bit_for_bit(batch):
    net, x, y = batch
    total, terms = HolisticLoss()(net, x, y)
    assert torch.equal(total, F.cross_entropy(net(x), y))
    assert set(terms) == {"ce", "total"}


def test_every_term_present_in_every_combination(batch):
    net, x, y = batch
    robust = {"eps": 0.1}
    stable = {"ratio": 0.5}
    sparse = {"l0": 1e-3}
    for r in (None, robust):
        for s in (None, stable):
            for sp in (None, sparse):
                loss = HolisticLoss(robust=r, stable=s, sparse=sp, l2=1e-4)
                model = small_net()
                if sp:
                    from hdl.sparsity import add_masks

                    add_masks(model)
                total, terms = loss(model, x, y)
                assert ("robust" in terms) == bool(r)
                assert ("stable" in terms) == bool(s)
                assert ("l0" in terms) == bool(sp)
                assert "l2" in terms
                expected = terms["stable"] if s else terms["robust"] if r else terms["ce"]
                expected = expected + 1e-4 * terms["l2"]
                if sp:
                    expected = expected + 1e-3 * terms["l0"]
                torch.testing.assert_close(total.detach(), expected)
                total.backward()
                if s:
                    assert loss.theta.grad is not None


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"robust": {"eps": -0.1}}, "loss.robust.eps"),
        ({"robust": {"eps": 0.1, "norm": "3"}}, "loss.robust.norm"),
        ({"robust": {"epsilon": 0.1}}, "loss.robust.epsilon"),
        ({"stable": {"ratio": 1.2}}, "loss.stable.ratio"),
        ({"sparse": {"l0": -1}}, "loss.sparse.l0"),
        ({"robust": {"eps": 0.1, "method": "magic"}}, "loss.robust.method"),
    ],
)
def test_bad_loss_config_names_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        HolisticLoss(**kwargs)


# --- adversarial training as the robust term (loss.robust.method = pgd | fgsm_rs) -----------


def _watch_training_forwards(model):
    """Record (training flag, input) of every forward call of the model's first layer."""
    calls = []
    model[0].register_forward_hook(lambda m, i, o: calls.append((m.training, i[0].detach())))
    return calls


@pytest.mark.parametrize("method", ["pgd", "fgsm_rs"])
def test_adversarial_training_loss_is_above_natural_loss(batch, method):
    net, x, y = batch
    loss = HolisticLoss(robust={"eps": 0.3, "method": method, "steps": 7})
    per, logits = loss.per_example(net, x, y)
    natural = F.cross_entropy(logits, y, reduction="none")
    assert per.mean() > natural.mean()
    if method == "pgd":  # 7 ascent steps from a random start beat the clean point everywhere
        assert (per >= natural - 1e-6).all()


@pytest.mark.parametrize("preset", ["pgd_at", "fgsm_at", "holistic_pgd"])
def test_adversarial_presets_compose_with_stable_and_sparse(batch, preset):
    from hdl.build import load_preset
    from hdl.sparsity import add_masks

    node = load_preset("loss", preset)
    assert node.pop("name") == preset
    loss = HolisticLoss(**node)
    assert loss.robust.method in ("pgd", "fgsm_rs")
    _, x, y = batch
    model = small_net()
    if loss.sparse.enabled:
        add_masks(model)
    total, terms = loss(model, x, y)
    assert terms["robust"] >= terms["ce"]
    expected = terms["stable"] if loss.stable.enabled else terms["robust"]
    if loss.sparse.enabled:
        expected = expected + loss.sparse.l0 * terms["l0"]
    torch.testing.assert_close(total.detach(), expected)
    total.backward()
    if preset == "holistic_pgd":
        assert loss.theta.grad is not None
        assert all(p.grad is not None for n, p in model.named_parameters() if "logits" in n)


def test_adversarial_examples_leave_batchnorm_and_dropout_alone():
    """Attack forwards run in eval mode; the only training-mode forward is the one step on
    [x, x_adv], so BatchNorm statistics move once, as in a plain step on 2B examples."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4)
    ).train()
    calls = _watch_training_forwards(model)
    modes = []
    model[3].register_forward_hook(lambda m, i, o: modes.append(m.training))
    x, y = torch.randn(12, 5), torch.randint(0, 4, (12,))
    total, _ = HolisticLoss(robust={"eps": 0.3, "method": "pgd", "steps": 3})(model, x, y)
    training = [inp for flag, inp in calls if flag]
    assert len(calls) > 1 and len(training) == 1 and len(training[0]) == 2 * len(x)
    assert sum(modes) == 1  # dropout active only in the training forward
    assert int(model[1].num_batches_tracked) == 1
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(training[0][: len(x)], x)
    total.backward()


@pytest.mark.parametrize("method", ["pgd", "fgsm_rs"])
def test_adversarial_examples_not_clamped_without_input_range(method):
    """Standardised tabular features (input_range None) are never clamped to [0, 1]; with a
    range, the examples stay in it."""
    net = small_net()
    calls = _watch_training_forwards(net)
    x, y = 3.0 * torch.randn(12, 5), torch.randint(0, 4, (12,))
    HolisticLoss(robust={"eps": 0.5, "method": method})(net, x, y)
    x_adv = calls[-1][1][len(x) :]
    assert ((x_adv - x).abs().amax(1) <= 0.5 + 1e-5).all() and not torch.equal(x_adv, x)
    assert x_adv.max() > 1.0 and x_adv.min() < 0.0  # outside [0, 1]: nothing clamped
    xr = torch.rand(12, 5)
    loss = HolisticLoss(robust={"eps": 0.5, "method": method}, input_range=(0.0, 1.0))
    loss(net, xr, y)
    x_adv = calls[-1][1][len(xr) :]
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0 and not torch.equal(x_adv, xr)
