"""Attacks: ball and box constraints, the affine map for unbounded inputs, strength ordering,
our regression PGD against torchattacks, and model-state hygiene."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from hdl.attacks import (
    ATTACKS,
    accuracy,
    cross_entropy_loss,
    evaluate_under_attack,
    natural_metrics,
    perturb,
    projected_gradient_attack,
)
from hdl.errors import ConfigError

TOL = 1e-6


def _norms(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    d = (x_adv - x).flatten(1)
    return d.abs().amax(dim=1) if norm == "inf" else d.norm(dim=1)


def _train(model: nn.Module, x, y, loss_fn, steps: int = 200, lr: float = 1e-2) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and OpenMP spin-waiting on a busy
    2-core machine made them ~20x slower; restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    """sklearn 8x8 digits scaled to [0, 1] as 1x8x8 images and a tiny trained MLP (~0.2 s)."""
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    _train(model, x[:1400], y[:1400], F.cross_entropy)
    return model, x[1400:], y[1400:]


@pytest.fixture(scope="module")
def tabular():
    """Standardised-looking 2-class tabular data far outside [0, 1] and a trained MLP."""
    g = torch.Generator().manual_seed(1)
    x = 3.0 * torch.randn(256, 6, generator=g) + 5.0
    y = ((x[:, 0] - x[:, 1] + 0.5 * x[:, 2]) > 2.5).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    _train(model, x, y, F.cross_entropy, steps=300)
    return model, x, y


CASES = [(a, n) for a, spec in ATTACKS.items() for n in spec.norms]


@pytest.mark.parametrize("attack,norm", CASES)
def test_images_stay_in_ball_and_unit_box(digits, attack, norm):
    model, x, y = digits
    x, y = x[:32], y[:32]
    eps = 0.1 if norm == "inf" else 1.0
    x_adv = perturb(
        model, x, y, eps=eps, attack=attack, norm=norm, steps=10, input_range=(0.0, 1.0), seed=0
    )
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert not x_adv.requires_grad
    assert (_norms(x_adv, x, norm) <= eps + TOL).all()
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert accuracy(model, x_adv, y) < accuracy(model, x, y)


def test_tiny_cnn_random_images_in_ball_and_box():
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3)
    )
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
    for norm, eps in (("inf", 0.05), ("2", 0.5)):
        x_adv = perturb(cnn, x, y, eps=eps, norm=norm, steps=5, input_range=(0.0, 1.0))
        assert (_norms(x_adv, x, norm) <= eps + TOL).all()
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
        assert (x_adv != x).any()


def test_unbounded_inputs_are_not_clamped():
    """A linear model has a constant gradient sign, so PGD ends on the ball's boundary: every
    coordinate moves by exactly eps (l_inf) / the whole move is eps (l_2), also beyond the
    data's [min, max] — the affine map into torchattacks' [0, 1] box is exact."""
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    x = 4.0 * torch.randn(64, 5) + 7.0  # far outside [0, 1], some negative
    y = model(x).argmax(1)
    eps = 0.5
    x_adv = perturb(model, x, y, eps=eps, norm="inf", steps=20, seed=0)
    assert torch.allclose((x_adv - x).abs(), torch.full_like(x, eps), atol=1e-5)
    assert ((x_adv > x.max()) | (x_adv < x.min())).any()
    x2 = perturb(model, x, y, eps=eps, norm="2", steps=20, seed=0)
    assert torch.allclose(_norms(x2, x, "2"), torch.full((64,), eps), atol=1e-5)
    assert (_norms(x2, x, "2") <= eps + TOL).all()
    # data inside [0, 1] but declared unbounded may leave [0, 1]
    xu = torch.rand(64, 5)
    xu_adv = perturb(model, xu, model(xu).argmax(1), eps=0.3, steps=10, seed=0)
    assert xu_adv.min() < 0.0 and xu_adv.max() > 1.0


@pytest.mark.parametrize("attack", ["pgd", "apgd", "square", "autoattack"])
def test_unbounded_tabular_attacks(tabular, attack):
    """Every attack on 2-D, 2-class data (AutoAttack needs >= 4 classes and 4-D tensors)."""
    model, x, y = tabular
    x, y = x[:64], y[:64]
    # AutoAttack's Square makes 5000 queries per surviving example: at the larger l_2 radius
    # nothing survives APGD, so only its l_inf run exercises every component (~3 s)
    big = attack == "autoattack"
    for norm, eps in (("inf", 2.0 if big else 0.5), ("2", 12.0 if big else 1.0)):
        x_adv = perturb(model, x, y, eps=eps, attack=attack, norm=norm, steps=20, seed=0)
        assert x_adv.shape == x.shape
        assert (_norms(x_adv, x, norm) <= eps + TOL).all()
        assert accuracy(model, x_adv, y) < accuracy(model, x, y)


def test_accuracy_falls_with_eps_to_chance(digits):
    model, x, y = digits
    eps_list = [0.0, 0.02, 0.05, 0.1, 0.3]
    res = evaluate_under_attack(
        model, x, y, eps_list=eps_list, steps=10, input_range=(0.0, 1.0), batch_size=200
    )
    accs = [res[e]["accuracy"] for e in eps_list]
    assert accs[0] == pytest.approx(natural_metrics(model, x, y)["accuracy"])
    assert accs[0] > 0.85
    assert all(a >= b for a, b in zip(accs, accs[1:], strict=False))
    assert accs[-1] <= 0.15  # 10 classes: chance is 0.1
    losses = [res[e]["loss"] for e in eps_list]
    assert all(a <= b for a, b in zip(losses, losses[1:], strict=False))
    raw = evaluate_under_attack(
        model, x, y, eps_list=eps_list, steps=10, input_range=(0.0, 1.0), cumulative=False
    )
    raw_accs = [raw[e]["accuracy"] for e in eps_list]
    assert all(a >= b - 0.02 for a, b in zip(raw_accs, raw_accs[1:], strict=False))


def test_pgd_not_weaker_than_fgsm(digits):
    model, x, y = digits
    kw = dict(eps_list=[0.05, 0.1], steps=20, input_range=(0.0, 1.0))
    pgd = evaluate_under_attack(model, x, y, attack="pgd", **kw)
    fgsm = evaluate_under_attack(model, x, y, attack="fgsm", **kw)
    for eps in (0.05, 0.1):
        assert pgd[eps]["accuracy"] <= fgsm[eps]["accuracy"] + 0.01


def test_own_pgd_loop_matches_torchattacks(digits):
    """Our loop with the cross-entropy loss is the same algorithm as torchattacks.PGD(L2)."""
    model, x, y = digits
    for norm, eps in (("inf", 0.05), ("2", 0.5)):
        torch.manual_seed(0)
        ours = projected_gradient_attack(
            model,
            x,
            y,
            eps=eps,
            norm=norm,
            steps=20,
            input_range=(0.0, 1.0),
            loss_fn=cross_entropy_loss,
        )
        theirs = perturb(model, x, y, eps=eps, norm=norm, steps=20, input_range=(0.0, 1.0))
        for x_adv in (ours, theirs):
            assert (_norms(x_adv, x, norm) <= eps + TOL).all()
            assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
        acc_ours, acc_theirs = accuracy(model, ours, y), accuracy(model, theirs, y)
        assert acc_ours < accuracy(model, x, y) - 0.2
        assert abs(acc_ours - acc_theirs) <= 0.05


def test_regression_attack_increases_mse_within_ball():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g) * 2.0 + 3.0
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.1 * torch.randn(128, generator=g))[:, None]
    torch.manual_seed(0)
    model = _train(
        nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1)), x, y, F.mse_loss, 300
    )
    clean = natural_metrics(model, x, y, task="regression")["mse"]
    for attack, norm, eps in (("pgd", "inf", 0.3), ("pgd", "2", 0.5), ("fgsm", "inf", 0.3)):
        x_adv = perturb(
            model, x, y, eps=eps, attack=attack, norm=norm, steps=10, task="regression", seed=0
        )
        assert (_norms(x_adv, x, norm) <= eps + TOL).all()
        adv = natural_metrics(model, x_adv, y, task="regression")["mse"]
        assert adv > clean + 0.5
    res = evaluate_under_attack(
        model, x, y.squeeze(1), eps_list=[0.0, 0.3], steps=10, task="regression", batch_size=50
    )
    assert res[0.0]["mse"] == pytest.approx(clean, rel=1e-5)
    assert res[0.3]["rmse"] ** 2 == pytest.approx(res[0.3]["mse"])
    assert res[0.3]["mse"] > clean
    # the bounded case clamps to the range
    xb = torch.rand(32, 4)
    x_adv = perturb(model, xb, model(xb).detach(), eps=0.3, task="regression", input_range=(0, 1))
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0 and (x_adv != xb).any()


@pytest.mark.parametrize("attack", ["pgd", "apgd", "autoattack"])
def test_model_state_untouched(attack):
    """Training flags (per module), BatchNorm statistics, requires_grad and .grad survive;
    the attack itself sees eval mode (no dropout); the global RNG is left as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4)
    )
    model.train()
    model[1].running_mean.normal_()
    model[4].eval()  # a deliberately mixed mode must survive too
    model[4].weight.requires_grad_(False)
    # accumulated gradients on the first layer must survive, the others must stay None
    grads = {n: torch.randn_like(p) for n, p in model[0].named_parameters(prefix="0")}
    for n, p in model.named_parameters():
        p.grad = grads.get(n)
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    model[3].register_forward_hook(lambda m, i, o: seen.append(m.training))
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    rng = torch.get_rng_state()
    x_adv = perturb(model, x, y, eps=0.3, attack=attack, steps=5, seed=1)
    assert (x_adv != x).any()
    assert torch.equal(torch.get_rng_state(), rng)
    assert seen and not any(seen)
    assert model.training and model[3].training and not model[4].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), k
    for n, p in model.named_parameters():
        assert p.requires_grad == (n != "4.weight")
        if n in grads:
            assert torch.equal(p.grad, grads[n]), n
        else:
            assert p.grad is None


class _LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 8, batch_first=True, dropout=0.0)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def test_lstm_classifier_can_be_attacked():
    torch.manual_seed(0)
    x = torch.randn(64, 10, 3)
    y = (x[:, :, 0].mean(1) > 0).long()
    model = _train(_LSTMClassifier(), x, y, F.cross_entropy, steps=60)
    model.train()
    clean = natural_metrics(model, x, y)
    for attack, norm, eps in (("pgd", "inf", 0.5), ("pgd", "2", 2.0), ("apgd", "inf", 0.5)):
        x_adv = perturb(model, x, y, eps=eps, attack=attack, norm=norm, steps=10, seed=0)
        assert x_adv.shape == x.shape
        assert (_norms(x_adv, x, norm) <= eps + TOL).all()
        assert natural_metrics(model, x_adv, y)["loss"] > clean["loss"]
    assert model.training and torch.backends.cudnn.enabled


def test_works_under_no_grad_and_inference_mode(digits):
    model, x, y = digits
    x, y = x[:32], y[:32]
    ref = perturb(model, x, y, eps=0.1, input_range=(0, 1), steps=5, seed=0)
    with torch.no_grad():
        a = perturb(model, x, y, eps=0.1, input_range=(0, 1), steps=5, seed=0)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        b = perturb(model, xi, yi, eps=0.1, input_range=(0, 1), steps=5, seed=0)
    assert torch.equal(a, ref) and torch.equal(b, ref) and (ref != x).any()


def test_seed_reproducible_and_norm_aliases(digits):
    model, x, y = digits
    x, y = x[:32], y[:32]
    kw = dict(eps=0.1, steps=5, input_range=(0.0, 1.0))
    a = perturb(model, x, y, seed=3, **kw)
    assert torch.equal(a, perturb(model, x, y, seed=3, **kw))
    assert not torch.equal(a, perturb(model, x, y, seed=4, **kw))
    for alias in (float("inf"), "linf", "Linf"):
        assert torch.equal(a, perturb(model, x, y, seed=3, norm=alias, **kw))
    b = perturb(model, x, y, seed=3, norm="2", **kw)
    for alias in (2, 2.0, "l2", "L2"):
        assert torch.equal(b, perturb(model, x, y, seed=3, norm=alias, **kw))


def test_eps_zero_returns_input_and_dtype_is_kept():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    assert torch.equal(perturb(model, x, y, eps=0.0), x)
    x_adv = perturb(model, x, y, eps=0.2, steps=5)
    assert x_adv.dtype == torch.float64 and (_norms(x_adv, x, "inf") <= 0.2 + TOL).all()


def test_single_logit_binary_classifier():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = torch.randn(32, 4)
    y = (model(x).squeeze(1) > 0).long()
    x_adv = perturb(model, x, y, eps=3.0, steps=10, seed=0)
    assert accuracy(model, x_adv, y) < 0.5


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(attack="nope"),
        dict(norm="1"),
        dict(norm=3),
        dict(eps=-0.1),
        dict(eps=float("nan")),
        dict(steps=0),
        dict(task="ranking"),
        dict(task="regression", attack="apgd"),
        dict(attack="fgsm", norm="2"),
        dict(input_range=(1.0, 0.0)),
    ],
)
def test_config_errors(kwargs):
    model = nn.Linear(4, 2)
    x, y = torch.randn(4, 4), torch.randint(0, 2, (4,))
    args = dict(eps=0.1) | kwargs
    with pytest.raises(ConfigError) as err:
        perturb(model, x, y, **args)
    assert "\n" not in str(err.value)
