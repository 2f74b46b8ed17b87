"""Numbers you can trust: robust accuracy counts a point only when it is correct on the clean
input and under attack; stored predictions, parameter counts, norms, metric keys, attack
domains, the θ rewind, the L2 term and the CVaR text all mean what they say."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from hdl.attacks import ATTACKS, evaluate_under_attack, perturb, worst_case
from hdl.errors import ConfigError
from hdl.keys import KINDS, SPLITS, metric_key, parse_metric_key


# --- a model whose input gradient lies: the attack's last iterate fixes its mistakes -------------
class _Liar(torch.autograd.Function):
    """Forward x, backward -grad: an attack that follows the gradient moves the wrong way."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return -grad


class LyingModel(nn.Module):
    """Two classes on one feature; class 1 iff x > 0.05. At x = 0 (label 1) it is wrong, and
    an attack that ascends the loss through the lying gradient ends at x = eps, where it is
    right: the old counting reported 0 % natural and 100 % "robust" accuracy."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.scale * (_Liar.apply(x.reshape(len(x), -1)[:, :1]) - 0.05)
        return torch.cat([torch.zeros_like(z), z], dim=1)


def _lying_case(n: int = 4) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    return LyingModel(), torch.zeros(n, 1), torch.ones(n, dtype=torch.long)


@pytest.mark.parametrize("attack", ["pgd", "fgsm"])
def test_attack_last_iterate_can_fix_a_mistake(attack):
    """The premise: the raw attacked input is classified correctly (so the old count was 100 %)."""
    model, x, y = _lying_case()
    x_adv = perturb(model, x, y, eps=0.1, attack=attack, steps=10, seed=0)
    assert (model(x).argmax(1) != y).all() and (model(x_adv).argmax(1) == y).all()


@pytest.mark.parametrize("cumulative", [True, False])
@pytest.mark.parametrize("attack", ["pgd", "fgsm"])
def test_robust_accuracy_counts_clean_and_attacked(attack, cumulative):
    model, x, y = _lying_case()
    res = evaluate_under_attack(
        model, x, y, eps_list=[0.0, 0.1], attack=attack, steps=10, cumulative=cumulative
    )
    assert res[0.0]["accuracy"] == 0.0
    assert res[0.1]["accuracy"] == 0.0  # was 1.0
    assert res[0.1]["loss"] >= res[0.0]["loss"]


def test_hdl_eval_robustness_counts_clean_and_attacked():
    from hdl.robustness import robustness

    model, x, y = _lying_case()
    res = robustness(model, x, y, attacks=["pgd", "fgsm"], eps=[0.1], l2_eps=[], steps=10)
    for by_eps in res.values():
        assert by_eps["0"]["accuracy"] == 0.0 and by_eps["0.1"]["accuracy"] == 0.0


def test_test_loop_counts_clean_and_attacked():
    from hdl.data.base import IndexBatches
    from hdl.eval_config import EvalConfig
    from hdl.losses import HolisticLoss
    from hdl.module import HolisticModule

    model, x, y = _lying_case(8)
    ev = EvalConfig(eps=(0.1,), steps=10, square_check=True, square_queries=50)
    module = HolisticModule(model, HolisticLoss(), optimizer=torch.optim.Adam, eval_cfg=ev)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
    )
    trainer.test(module, dataloaders=IndexBatches(x, y, 4, shuffle=False), verbose=False)
    m = module.test_results
    assert m["test/acc"] == 0.0
    assert m["test/pgd_acc@0.1"] == 0.0 and m["test/square_acc@0.1"] == 0.0


def test_worst_case_is_never_better_than_clean():
    g = torch.Generator().manual_seed(0)
    clean = (torch.rand(50, generator=g), torch.rand(50, generator=g) > 0.5)
    attacked = (torch.rand(50, generator=g), torch.rand(50, generator=g) > 0.5)
    loss, correct = worst_case(clean, attacked)
    assert (correct <= clean[1]).all() and (correct <= attacked[1]).all()
    assert torch.equal(loss, torch.maximum(clean[0], attacked[0]))
    loss, correct = worst_case((clean[0], None), (attacked[0], None))  # regression
    assert correct is None and (loss >= clean[0]).all()


def test_regression_error_under_attack_is_at_least_the_clean_error():
    model, x, _ = _lying_case()
    net = nn.Sequential(model, nn.Linear(2, 1))
    y = torch.zeros(len(x))
    res = evaluate_under_attack(net, x, y, eps_list=[0.0, 0.1], steps=5, task="regression")
    assert res[0.1]["mse"] >= res[0.0]["mse"]


# --- stored predictions and parameter counts ------------------------------------------------------
def test_predictions_are_stored_as_float32(tmp_path):
    from hdl.report import write_run_files

    class Holder(nn.Module):  # what write_run_files reads of a HolisticModule
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(2, 2)
            self.test_logits = [torch.tensor([[1.0001, 1.0002], [70000.0, -3.0]])]
            self.test_targets = [torch.tensor([1, 0])]

    write_run_files(tmp_path, {"metrics": {}}, Holder())
    with np.load(tmp_path / "predictions.npz") as f:
        logits = f["logits"]
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    assert logits[0].argmax() == 1 and logits[1, 0] == 70000.0  # float16: a tie, and inf


def test_parameter_counts_are_the_networks_real_parameters():
    from hdl.sparsity import add_masks, parameter_counts, set_hard

    net = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    real = sum(p.numel() for p in net.parameters())
    add_masks(net, init=0.1)
    assert sum(p.numel() for p in net.parameters()) > real  # mask logits are parameters too
    assert parameter_counts(net) == (real, real)
    with torch.no_grad():
        net[0].parametrizations.weight[0].logits[:2].fill_(-1.0)  # 2 rows x 10 inputs pruned
    set_hard(net)
    assert parameter_counts(net) == (real, real - 20)


# --- one norm vocabulary, validated before training -------------------------------------------------
def test_eval_norm_one_is_refused_when_the_config_is_validated(tmp_path):
    from hdl.config import validate
    from tests.conftest import compose

    with pytest.raises(ConfigError, match="eval.norm"):
        validate(compose(["eval.norm=1"], tmp_path))
    with pytest.raises(ConfigError, match="eval.norm"):
        validate(compose(["eval.attack=fgsm", "eval.norm=2"], tmp_path))
    validate(compose(["loss=robust", "loss.robust.norm=1", "eval.norm=l2"], tmp_path))


def test_one_norm_parser_for_loss_and_attacks():
    from hdl.norms import ATTACK_NORMS, norm_value, parse_norm

    for alias, name in [(math.inf, "inf"), ("Linf", "inf"), (2, "2"), ("l2", "2"), ("l1", "1")]:
        assert parse_norm(alias) == name
    assert norm_value("inf") == math.inf and norm_value(1) == 1.0
    with pytest.raises(ConfigError, match="eval.norm"):
        parse_norm("1", "eval.norm", ATTACK_NORMS)
    with pytest.raises(ConfigError):
        parse_norm(True)


# --- metric keys: one format, one parser, every attack ------------------------------------------------
def _every_attack_label():
    from hdl.robustness import attack_label

    labels = [name for name in ATTACKS]  # the test loop's names
    labels += [attack_label(name, norm) for name, spec in ATTACKS.items() for norm in spec.norms]
    return labels


@pytest.mark.parametrize("label", _every_attack_label())
def test_metric_key_round_trip(label):
    for split in SPLITS:
        for kind in KINDS:
            for eps in (0.0, 0.1, 0.3, 2.0, 1e-5, 1.25, 10.0):
                key = metric_key(split, label, kind, eps)
                parsed = parse_metric_key(key)
                assert parsed == (split, label, kind, float(f"{eps:g}")), key


def test_hdl_eval_attack_names_parse_back():
    from hdl.robustness import attack_label, parse_attack

    for name, spec in ATTACKS.items():
        for norm in spec.norms:
            assert parse_attack(attack_label(name, norm)) == (name, norm)
    with pytest.raises(ConfigError):
        parse_attack("fgsm_l2")


def test_compare_keeps_every_hdl_eval_column():
    from hdl.compare import Variant, _eval_metrics, adversarial_keys
    from hdl.robustness import attack_label

    robustness = {
        attack_label(name, norm): {"0": {"accuracy": 0.9}, "0.1": {"accuracy": 0.5}}
        for name, spec in ATTACKS.items()
        for norm in spec.norms
    }
    metrics = _eval_metrics({"task": "classification", "robustness": robustness})
    v = Variant("x", [], {k: (v, 0.0) for k, v in metrics.items()}, {}, {}, [])
    assert {a for a, _ in adversarial_keys([v], prefix="eval/")} == set(robustness)
    assert ("pgd_l2", 0.1) in adversarial_keys([v], prefix="eval/")


def test_non_metric_keys_do_not_parse():
    for key in ("test/acc", "val/loss", "sparsity/zero_fraction", "test/pgd_acc@x", "pgd_acc@0.1"):
        assert parse_metric_key(key) is None


# --- unused inputs of a bidirectional RNN --------------------------------------------------------
def test_unused_inputs_read_both_directions_of_a_bidirectional_rnn():
    from hdl.sparsity_report import unused_inputs

    rnn = nn.LSTM(5, 4, bidirectional=True, batch_first=True)
    with torch.no_grad():
        rnn.weight_ih_l0[:, 0] = 0  # feature 0 unused forwards, read backwards
        rnn.weight_ih_l0[:, 1] = 0
        rnn.weight_ih_l0_reverse[:, 1] = 0  # feature 1 unused in both directions
    assert unused_inputs(rnn) == 1
    lin = nn.Linear(5, 3)
    with torch.no_grad():
        lin.weight[:, 4] = 0
    assert unused_inputs(lin) == 1


# --- the attack box of unstandardised data comes from the training rows ----------------------------
def test_input_range_is_the_training_rows_or_declared(tmp_path):
    from hdl.data.tabular import CSVDataModule

    g = np.random.default_rng(0)
    x = g.uniform(0, 1, size=(200, 3))
    y = (x[:, 0] > 0.5).astype(int)
    x[0] = 1000.0  # one extreme row
    path = tmp_path / "d.csv"
    rows = ["a,b,c,label"] + [f"{a},{b},{c},{t}" for (a, b, c), t in zip(x, y, strict=True)]
    path.write_text("\n".join(rows) + "\n")
    dm = CSVDataModule(str(path), standardize=False, seed=0)
    dm.prepare_arrays()
    train = dm.tensors["train"][0]
    assert dm.input_range == (float(train.min()), float(train.max()))
    in_test = 0 in dm.split_indices["test"]
    assert (dm.input_range[1] == 1000.0) != in_test  # the test row never widens the box
    declared = CSVDataModule(str(path), standardize=False, input_range=[0, 2000])
    declared.prepare_arrays()
    assert declared.input_range == (0.0, 2000.0)
    with pytest.raises(ConfigError, match="data.input_range"):
        CSVDataModule(str(path), input_range=[1, 0])


def test_a_clean_point_outside_the_range_stays_within_its_ball():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.tensor([[5.0, 0.5, 0.5], [0.2, 0.5, 0.5]])
    y = torch.tensor([0, 1])
    for attack in ("pgd", "fgsm", "square"):
        x_adv = perturb(model, x, y, eps=0.1, attack=attack, steps=5, input_range=(0.0, 1.0))
        assert ((x_adv - x).abs() <= 0.1 + 1e-6).all(), attack
        assert (x_adv[1] >= 0).all() and (x_adv[1] <= 1).all()


# --- Square: queries configurable, 5,000 in hdl-eval ------------------------------------------------
def test_square_queries_reach_torchattacks():
    from hdl.attacks import EVAL_SQUARE_QUERIES, _build

    g = nn.Linear(4, 2)
    atk = _build("square", g, 0.1, "inf", 40, None, True, 2, 0, queries=123)
    assert atk.n_queries == 123
    assert EVAL_SQUARE_QUERIES >= 5000


def test_hdl_eval_runs_square_at_every_eps_with_5000_queries():
    import inspect

    from hdl.evaluate import evaluate_run
    from hdl.robustness import robustness

    for fn in (evaluate_run, robustness):
        assert inspect.signature(fn).parameters["square_queries"].default >= 5000
    model, x, y = _lying_case()
    res = robustness(model, x, y, attacks=["square"], eps=[0.05, 0.1], l2_eps=[], steps=5)
    assert set(res["square_linf"]) == {"0", "0.05", "0.1"}


# --- config defaults come from the loss config --------------------------------------------------
def test_validate_takes_sparsity_defaults_from_the_sparse_config(tmp_path):
    """The old check assumed 2 search rounds (the config says 1) and refused short runs; the
    schedule now shrinks for a smoke run (with a warning) and validation keeps no copy of
    the sparse defaults."""
    import inspect

    import hdl.config
    from hdl.config import validate
    from tests.conftest import compose

    assert "search_rounds" not in inspect.getsource(hdl.config)
    validate(compose(["loss=sparse", "~loss.sparse.search_rounds", "trainer.max_epochs=1"]))
    validate(compose(["loss=holistic", "trainer.max_epochs=1"]))


# --- θ of the stability term is rewound with the weights between sparsity rounds -----------------
def test_theta_is_rewound_and_its_optimizer_state_reset_between_rounds():
    import functools

    from hdl.data.base import IndexBatches
    from hdl.losses import HolisticLoss
    from hdl.module import HolisticModule
    from hdl.sparsity import SparseConfig, SparsityCallback

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    loss = HolisticLoss(stable={"ratio": 0.5}, sparse={"l0": 1e-3, "mask_lr": 0.05})
    module = HolisticModule(net, loss, optimizer=functools.partial(torch.optim.Adam, lr=0.05))
    cb = SparsityCallback(
        SparseConfig(l0=1.0, search_rounds=1, rewind_fraction=0.5, final_temp=10.0)
    )
    seen: dict[int, tuple[float, bool, dict | None]] = {}

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            if batch_idx:
                return
            theta = pl_module.loss.theta
            state = theta in trainer.optimizers[0].state
            snap = None if cb.snapshot is None else dict(cb.snapshot)
            seen[trainer.current_epoch] = (float(theta.detach()), state, snap)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb, Probe()],
    )
    trainer.fit(module, IndexBatches(x, y, 16, shuffle=False))
    theta_at_snapshot, _, snap = seen[1]  # the snapshot is taken before step 4 (epoch 1's first)
    assert "loss.theta" in snap and float(snap["loss.theta"]) == theta_at_snapshot
    assert seen[1][0] != seen[0][0]  # θ moved during round 0 ...
    assert seen[2][0] == theta_at_snapshot  # ... and was rewound with the weights
    assert seen[2][1] is False and seen[3][1] is True  # fresh Adam state at the round start


# --- the L2 term: effective weights, no biases -----------------------------------------------------
def test_l2_penalises_the_effective_weights_not_biases_or_masked_values():
    from hdl.losses import HolisticLoss
    from hdl.sparsity import add_masks, effective_weights, set_hard

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    add_masks(net, init=0.1)
    with torch.no_grad():
        net[0].parametrizations.weight.original.mul_(100.0)  # big raw values ...
        net[0].parametrizations.weight[0].logits[:, :3].fill_(-1.0)  # ... mostly pruned
        net[0].bias.fill_(50.0)
    set_hard(net)
    loss = HolisticLoss(l2=1e-3, sparse={"l0": 1e-6})
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    total, terms = loss(net, x, y)
    eff = effective_weights(net)
    expected = eff["0.weight"].pow(2).sum() + eff["3.weight"].pow(2).sum()
    assert terms["l2"] == pytest.approx(float(expected), rel=1e-6)
    raw = net[0].parametrizations.weight.original
    assert float(terms["l2"]) < float(raw.detach().pow(2).sum())  # pruned raw weights: no cost
    net.zero_grad()
    total.backward()
    grad_with = net[0].bias.grad.clone()
    net.zero_grad()
    HolisticLoss(sparse={"l0": 1e-6})(net, x, y)[0].backward()
    assert torch.allclose(grad_with, net[0].bias.grad)  # biases are not penalised


# --- the stability term's optimum is the fractional CVaR ----------------------------------------
def test_stable_loss_minimum_is_the_fractional_cvar():
    from hdl.losses import stable_loss

    losses = torch.tensor([0.1, 2.0, 0.5, 1.5, 3.0, 0.2, 0.9, 1.1, 0.05, 2.5], dtype=torch.float64)
    ordered = losses.sort(descending=True).values
    for ratio in (0.25, 0.33, 0.5, 0.87):
        m = ratio * len(losses)
        k = math.floor(m)
        cvar = (ordered[:k].sum() + (m - k) * ordered[k]) / m
        thetas = torch.linspace(-1, 4, 5001, dtype=torch.float64)
        best = min(float(stable_loss(losses, t, ratio)) for t in thetas)
        assert best == pytest.approx(float(cvar), abs=1e-6)
        if m != k:  # not the mean of the ceil(m) largest, which the old docstring claimed
            assert float(ordered[: math.ceil(m)].mean()) != pytest.approx(float(cvar), abs=1e-3)
