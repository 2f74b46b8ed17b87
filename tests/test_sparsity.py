"""Continuous sparsification: masks, penalty, schedule, hard masks (RNNs included), the callback."""

from __future__ import annotations

import copy
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

from hdl.errors import ConfigError
from hdl.sparsity import (
    ContinuousMask,
    SparseConfig,
    SparsityCallback,
    add_masks,
    clip_logits,
    effective_state,
    l0_penalty,
    mask_parameters,
    masks,
    plan_schedule,
    set_hard,
    set_temperature,
    strip_masks,
    temperature_at,
    zero_fractions,
)

CUDNN = [False, True]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --- small networks ---------------------------------------------------------------------------


class SeqNet(nn.Module):
    """Conv1d front, a recurrent layer, an Embedding-free linear head."""

    def __init__(self, cell: type[nn.RNNBase] = nn.LSTM, bidirectional: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, kernel_size=3, padding=1)
        self.norm = nn.LayerNorm(4)
        self.rnn = cell(4, 5, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(5 * (2 if bidirectional else 1), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, 3)
        h = self.conv(x.transpose(1, 2)).transpose(1, 2)
        out, _ = self.rnn(self.norm(h))
        return self.head(out.mean(1))  # every step, so every weight matters


def image_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.ConvTranspose2d(3, 2, 2),
        nn.Flatten(),
        nn.Linear(2 * 7 * 7, 4),
    )


def random_logits(model: nn.Module) -> None:
    """Logits of random sign, away from 0 so that the hard mask is unambiguous."""
    with torch.no_grad():
        for _, m in masks(model):
            m.logits.copy_(torch.randn_like(m.logits).sign() * (0.1 + torch.rand_like(m.logits)))


def hand_masked_copy(plain: nn.Module, masked: nn.Module, hard: bool) -> nn.Module:
    """An unparametrized copy of ``plain`` whose weights were multiplied by ``masked``'s masks."""
    out = copy.deepcopy(plain)
    modules = dict(out.named_modules())
    with torch.no_grad():
        for name, m in masks(masked):
            mod_name, _, tensor_name = name.rpartition(".")
            w = getattr(modules[mod_name], tensor_name)
            w.mul_((m.logits > 0).to(w.dtype) if hard else m.mask())
    return out


# --- the mask and its registration -------------------------------------------------------------


def test_masks_are_identity_at_start_and_cover_exactly_the_weights() -> None:
    for model, x in ((SeqNet(), torch.randn(4, 6, 3)), (image_net(), torch.randn(2, 1, 8, 8))):
        model.eval()
        before = model(x)
        n = add_masks(model)
        names = [name for name, _ in masks(model)]
        assert n == len(names) and add_masks(model) == 0  # idempotent
        assert torch.equal(model(x), before)  # m == 1 exactly at init 0
        assert all(name.endswith("weight") or "weight_" in name for name in names)
        assert not any("bias" in name or "norm" in name for name in names)
    assert names == ["0.weight", "3.weight", "5.weight"]  # BatchNorm2d left alone
    seq = SeqNet()
    add_masks(seq)
    rnn_names = [n for n, _ in masks(seq) if n.startswith("rnn.")]
    assert len(rnn_names) == 8  # 2 layers x 2 directions x (ih, hh)
    assert "rnn.weight_hh_l1_reverse" in rnn_names
    embed = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2))
    assert add_masks(embed) == 1 and masks(embed)[0][0] == "1.weight"


def test_mask_formula_and_buffers() -> None:
    w = torch.randn(3, 4)
    m = ContinuousMask(w, init=0.0)
    assert m.logits.shape == w.shape and m.temperature.ndim == 0 and m.hard.ndim == 0
    assert torch.equal(m(w), w)
    with torch.no_grad():
        m.logits.copy_(torch.linspace(-1, 1, 12).view(3, 4))
    m.temperature.fill_(3.0)
    torch.testing.assert_close(
        m.mask(), torch.sigmoid(3.0 * m.logits) / torch.sigmoid(torch.tensor(0.0))
    )
    m.hard.fill_(True)
    assert torch.equal(m.mask(), (m.logits > 0).float())
    names = dict(m.state_dict())
    assert {"logits", "temperature", "hard"} <= set(names)


@pytest.mark.parametrize("init", [-0.3, 0.1, 0.5])
def test_mask_is_one_at_start_for_any_init(init: float) -> None:
    """Normalised by sigmoid(s0) (Savarese et al.'s code), not sigmoid(0): m == 1 at the start
    for a non-zero init too, and the hard mask still thresholds at 0."""
    w = torch.randn(4, 3)
    m = ContinuousMask(w, init=init)
    torch.testing.assert_close(m.mask(), torch.ones_like(w))
    torch.testing.assert_close(m(w), w)
    m.temperature.fill_(7.0)
    expected = torch.sigmoid(torch.tensor(7.0 * init)) / torch.sigmoid(torch.tensor(init))
    torch.testing.assert_close(m.mask(), expected.expand_as(w))
    m.hard.fill_(True)
    assert torch.equal(m.mask(), torch.full_like(w, float(init > 0)))


def test_penalty_counts_masks_and_its_gradient_reaches_the_logits() -> None:
    model = SeqNet()
    assert l0_penalty(model).ndim == 0 and float(l0_penalty(model)) == 0.0  # no masks yet
    add_masks(model)
    penalty = l0_penalty(model)
    n_weights = sum(m.logits.numel() for _, m in masks(model))
    assert n_weights > 1 and penalty.ndim == 0 and penalty.item() == pytest.approx(1.0)  # a mean
    penalty.backward()
    for _, m in masks(model):
        assert m.logits.grad is not None and torch.all(m.logits.grad > 0)
    assert {id(p) for p in mask_parameters(model)} == {id(m.logits) for _, m in masks(model)}
    set_hard(model, True)  # frozen: still a 0-dim count, no graph
    assert not l0_penalty(model).requires_grad


def test_temperature_schedule_is_geometric() -> None:
    assert temperature_at(0.0, 200.0) == 1.0
    assert temperature_at(1.0, 200.0) == pytest.approx(200.0)
    assert temperature_at(0.5, 200.0) == pytest.approx(math.sqrt(200.0))
    values = [temperature_at(i / 10, 50.0) for i in range(11)]
    ratios = [b / a for a, b in zip(values, values[1:], strict=False)]
    assert ratios == pytest.approx([50.0**0.1] * 10)
    assert temperature_at(-1.0, 50.0) == 1.0 and temperature_at(2.0, 50.0) == pytest.approx(50.0)
    model = nn.Linear(2, 2)
    add_masks(model)
    set_temperature(model, 7.0)
    assert float(masks(model)[0][1].temperature) == 7.0


def test_clip_logits_math_and_mask_survives_temperature_restart() -> None:
    model = nn.Linear(5, 1, bias=False)
    add_masks(model)
    logits = torch.tensor([[-1.0, -0.01, 0.0, 0.003, 2.0]])
    mask = masks(model)[0][1]
    with torch.no_grad():
        mask.logits.copy_(logits)
    clip_logits(model, 200.0, 0.0)
    assert torch.equal(mask.logits, torch.tensor([[-200.0, -2.0, 0.0, 0.0, 0.0]]))
    with torch.no_grad():
        mask.logits.copy_(logits)
    clip_logits(model, 200.0, 0.5)
    assert torch.equal(mask.logits, torch.tensor([[-200.0, -2.0, 0.0, 0.5, 0.5]]))

    # what the clip is for: the soft mask at temperature final_temp at the end of a round is what
    # the next round starts from at temperature 1 (fails if the clip drops final_temp)
    with torch.no_grad():
        mask.logits.copy_(torch.tensor([[-0.5, -0.05, 0.05, 0.1, 0.5]]))
    set_temperature(model, 200.0)
    end_of_round = mask.mask().detach()
    clip_logits(model, 200.0, 0.0)
    set_temperature(model, 1.0)
    start_of_next = mask.mask().detach()
    pruned = end_of_round < 1e-3
    assert pruned.tolist() == [[True, True, False, False, False]]
    assert torch.all(start_of_next[pruned] < 1e-3)
    assert torch.all(start_of_next[~pruned] == 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cudnn", CUDNN)
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_rnn_forward_uses_the_masked_weights(cell, cudnn: bool, device: str) -> None:
    plain = SeqNet(cell).to(device)
    model = copy.deepcopy(plain)
    add_masks(model)
    x = torch.randn(3, 7, 3, device=device)
    with torch.backends.cudnn.flags(enabled=cudnn):
        start = model(x)
        torch.testing.assert_close(start, plain(x), rtol=0, atol=0)
        random_logits(model)
        set_temperature(model, 2.0)
        soft = model(x)
        assert not torch.allclose(soft, start)  # the mask change reaches the RNN output
        torch.testing.assert_close(soft, hand_masked_copy(plain, model, hard=False)(x))
        set_hard(model, True)
        hard = model(x)
        expected = hand_masked_copy(plain, model, hard=True)
        torch.testing.assert_close(hard, expected(x))
        for name, m in masks(model):
            mod_name, _, tensor_name = name.rpartition(".")
            value = getattr(model.get_submodule(mod_name), tensor_name)
            assert torch.equal(value == 0, m.logits <= 0)  # exact zeros where s <= 0
            assert not m.logits.requires_grad
        # the zeros are what the forward uses: the unmasked copy differs, the hand-zeroed one not
        assert not torch.allclose(hard, plain(x))
        assert not torch.allclose(hard, soft)


@pytest.mark.parametrize("cudnn", CUDNN)
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_double_backward_through_masked_rnn(cell, cudnn: bool) -> None:
    model = SeqNet(cell)
    add_masks(model)
    random_logits(model)
    x = torch.randn(2, 5, 3, requires_grad=True)
    with torch.backends.cudnn.flags(enabled=cudnn):
        out = model(x)
        (gx,) = torch.autograd.grad(out[:, 0].sum(), x, create_graph=True)
        (out.sum() + gx.abs().sum()).backward()
    for name, m in masks(model):
        assert m.logits.grad is not None and torch.isfinite(m.logits.grad).all(), name
        assert m.logits.grad.abs().sum() > 0, name


def test_hard_masks_give_exact_zeros_in_linear_and_conv() -> None:
    model = image_net()
    plain = copy.deepcopy(model)
    add_masks(model)
    random_logits(model)
    set_hard(model, True)
    fractions = zero_fractions(model)
    for name, m in masks(model):
        module = model.get_submodule(name.rpartition(".")[0])
        w = module.weight
        assert torch.equal(w == 0, m.logits <= 0)
        assert fractions[name] == pytest.approx(float((m.logits <= 0).float().mean()))
        assert not m.logits.requires_grad
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    expected = hand_masked_copy(plain, model, hard=True).eval()
    torch.testing.assert_close(model(x), expected(x))
    set_hard(model, False)
    assert all(m.logits.requires_grad and not bool(m.hard) for _, m in masks(model))


def test_hard_mask_keeps_positive_logits_not_negative_ones() -> None:
    """The reference TF code keeps s < 0; the kept weights must be those with s > 0."""
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    add_masks(model)
    with torch.no_grad():
        masks(model)[0][1].logits.copy_(torch.tensor([[2.0, -2.0, 0.5, -0.5]]))
    set_hard(model, True)
    assert model.weight.tolist() == [[1.0, 0.0, 3.0, 0.0]]
    assert model(torch.ones(1, 4)).item() == 4.0


def test_zero_fractions_count_unmasked_layers_and_weight_the_total() -> None:
    model = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 2))  # 40 + 20 weights
    with torch.no_grad():
        model[2].weight[:, :5] = 0.0  # unmasked layer, half zero
    add_masks(model[0])
    with torch.no_grad():
        masks(model)[0][1].logits.fill_(1.0)
        masks(model)[0][1].logits[:, :1] = -1.0  # 10 of 40 pruned once hard
    set_hard(model, True)
    fr = zero_fractions(model)
    assert set(fr) == {"0.weight", "2.weight", "total"}
    assert fr["0.weight"] == 0.25 and fr["2.weight"] == 0.5
    assert fr["total"] == pytest.approx(20 / 60)
    assert zero_fractions(nn.ReLU()) == {"total": 0.0}


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_strip_masks_and_effective_state_bake_the_masked_values(cell) -> None:
    plain = SeqNet(cell)
    model = copy.deepcopy(plain)
    add_masks(model)
    random_logits(model)
    set_hard(model, True)
    x = torch.randn(3, 6, 3)
    masked_out = model(x)
    copied = copy.deepcopy(model)  # deep copies still work after a forward of a masked RNN
    torch.testing.assert_close(copied(x), masked_out)
    fractions = zero_fractions(model)

    state = effective_state(model)
    assert set(state) == set(plain.state_dict())
    loaded = copy.deepcopy(plain)
    loaded.load_state_dict(state)
    torch.testing.assert_close(loaded(x), masked_out)

    assert strip_masks(model) is model
    assert masks(model) == [] and not any(parametrize.is_parametrized(m) for m in model.modules())
    assert set(dict(model.named_parameters())) == set(dict(plain.named_parameters()))
    assert type(model.rnn) is cell and not model.rnn._forward_pre_hooks
    torch.testing.assert_close(model(x), masked_out)
    assert zero_fractions(model) == fractions
    # the stripped RNN still trains its (now plain) weights
    model(x).sum().backward()
    assert model.rnn.weight_ih_l0.grad is not None


# --- the callback ------------------------------------------------------------------------------


class TinyModule(pl.LightningModule):
    def __init__(self, l0: float = 1e-3, lr: float = 0.01, mask_lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        add_masks(self.net)
        self.l0, self.lr, self.mask_lr = l0, lr, mask_lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        x, y = batch
        return F.cross_entropy(self.net(x), y) + self.l0 * l0_penalty(self.net)

    def configure_optimizers(self):  # noqa: ANN201
        mask_ids = {id(p) for p in mask_parameters(self.net)}
        weights = [p for p in self.net.parameters() if id(p) not in mask_ids]
        return torch.optim.Adam(
            [{"params": weights}, {"params": mask_parameters(self.net), "lr": self.mask_lr}],
            lr=self.lr,
        )


def loader(n: int = 64, batch_size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # only 2 of 8 features matter
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(max_epochs: int, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def weights_of(net: nn.Module) -> dict[str, torch.Tensor]:
    ids = {id(p) for p in mask_parameters(net)}
    return {n: p.detach().clone() for n, p in net.named_parameters() if id(p) not in ids}


class Probe(pl.Callback):
    """Runs after SparsityCallback and records what it did."""

    def __init__(self, cb: SparsityCallback) -> None:
        self.cb = cb
        self.temps: list[tuple[int, float]] = []
        self.epoch_start: dict[int, dict] = {}
        self.epoch_end: dict[int, dict] = {}
        self.initial: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.initial = weights_of(pl_module.net)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        """The state at an epoch's first step, after SparsityCallback acted on it."""
        if batch_idx != 0:
            return
        net = pl_module.net
        params = [p for p in net.parameters()]
        self.epoch_start[trainer.current_epoch] = {
            "weights": weights_of(net),
            "masks": [m.mask().detach().clone() for _, m in masks(net)],
            "logits": [m.logits.detach().clone() for _, m in masks(net)],
            "hard": [bool(m.hard) for _, m in masks(net)],
            "opt_state": sum(p in trainer.optimizers[0].state for p in params),
            "snapshot": None if self.cb.snapshot is None else dict(self.cb.snapshot),
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        t = float(masks(pl_module.net)[0][1].temperature)
        self.temps.append((trainer.current_epoch, t))

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        net = pl_module.net
        self.epoch_end[trainer.current_epoch] = {
            "masks": [m.mask().detach().clone() for _, m in masks(net)],
            "logits": [m.logits.detach().clone() for _, m in masks(net)],
        }


def test_callback_runs_rounds_rewinds_and_ends_hard() -> None:
    torch.manual_seed(0)
    module = TinyModule()
    cb = SparsityCallback(
        SparseConfig(l0=1.0, search_rounds=2, rewind_fraction=0.5, final_temp=200.0)
    )
    probe = Probe(cb)
    trainer(6, [cb, probe]).fit(module, loader())
    net = module.net
    assert cb.schedule.round_steps == 8 and cb.current_round == 2

    # temperature: geometric from 1 to final_temp within each search round (4 batches x 2 epochs)
    temps = [t for _, t in probe.temps]
    for r in range(2):
        round_temps = temps[8 * r : 8 * (r + 1)]
        assert round_temps[0] == pytest.approx(1.0) and round_temps[-1] == pytest.approx(200.0)
        ratios = [b / a for a, b in zip(round_temps, round_temps[1:], strict=False)]
        assert ratios == pytest.approx([200.0 ** (1 / 7)] * 7)

    # snapshot: the weights before step 4 (rewind_fraction 0.5 of an 8-step round: the start of
    # epoch 1); rewound (and optimizer state reset) at the start of every later round
    snap = probe.epoch_start[1]["weights"]
    assert probe.epoch_start[0]["snapshot"] is None and probe.epoch_start[1]["snapshot"] is not None
    assert all(torch.equal(snap[k], v) for k, v in cb.snapshot.items())
    assert set(cb.snapshot) == set(snap)  # net weights only, no mask logits
    assert not any("logits" in k for k in cb.snapshot)
    assert not all(torch.equal(snap[k], probe.initial[k]) for k in snap)
    for epoch in (2, 4):
        start = probe.epoch_start[epoch]
        assert all(torch.equal(start["weights"][k], snap[k]) for k in snap)
        assert start["opt_state"] == 0
    assert probe.epoch_start[3]["opt_state"] > 0

    # between search rounds: clipped, so what round 0 pruned stays pruned at temperature 1
    # (a clip without final_temp would revive them)
    for end, start in zip(probe.epoch_end[1]["masks"], probe.epoch_start[2]["masks"], strict=True):
        pruned = end < 1e-3
        assert torch.all(start[pruned] < 1e-3)

    # the final round is hard and frozen from its first step; kept weights are those with s > 0,
    # which are the ones the last search round ended with a soft mask > 1 for
    assert (
        probe.epoch_start[4]["hard"] == [True] * 2 and probe.epoch_start[3]["hard"] == [False] * 2
    )
    for (name, m), last_soft, hard_start in zip(
        masks(net), probe.epoch_end[3]["masks"], probe.epoch_start[4]["logits"], strict=True
    ):
        assert bool(m.hard) and not m.logits.requires_grad
        assert torch.equal(m.logits, hard_start)  # frozen for the whole final round
        w = net.get_submodule(name.rpartition(".")[0]).weight
        assert torch.equal(w != 0, m.logits > 0)
        assert torch.equal(m.logits > 0, last_soft > 1)
    fraction = zero_fractions(net)["total"]
    assert 0.0 < fraction < 1.0
    assert trainer_metrics_ok(cb, module)


def trainer_metrics_ok(cb: SparsityCallback, module: TinyModule) -> bool:
    metrics = module.trainer.callback_metrics
    return (
        float(metrics["sparsity/zero_fraction"])
        == pytest.approx(zero_fractions(module.net)["total"])
        and float(metrics["sparsity/round"]) == 2.0
        and "sparsity/temperature" in metrics
    )


def test_rewind_fraction_zero_snapshots_the_initial_weights() -> None:
    module = TinyModule()
    initial = weights_of(module.net)
    cb = SparsityCallback(
        SparseConfig(l0=1.0, search_rounds=1, rewind_fraction=0.0, final_temp=10.0)
    )
    trainer(4, [cb]).fit(module, loader())
    assert all(torch.equal(cb.snapshot[k], v) for k, v in initial.items())
    assert cb.schedule.round_steps == 8 and all(bool(m.hard) for _, m in masks(module.net))


class SaveAt(pl.Callback):
    def __init__(self, paths: dict[int, str]) -> None:
        self.paths = paths

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        if trainer.current_epoch in self.paths:
            trainer.save_checkpoint(self.paths[trainer.current_epoch])


def test_callback_state_round_trip_and_resume(tmp_path) -> None:
    paths = {3: str(tmp_path / "e3.ckpt"), 4: str(tmp_path / "e4.ckpt")}
    torch.manual_seed(0)
    full = TinyModule()
    cb = SparsityCallback(
        SparseConfig(l0=1.0, search_rounds=2, rewind_fraction=0.5, final_temp=50.0)
    )
    trainer(6, [cb, SaveAt(paths)]).fit(full, loader())

    state = cb.state_dict()
    other = SparsityCallback(
        SparseConfig(l0=1.0, search_rounds=2, rewind_fraction=0.5, final_temp=50.0)
    )
    other.load_state_dict(copy.deepcopy(state))
    assert other.current_round == 2 and other.schedule == cb.schedule
    assert set(other.snapshot) == set(cb.snapshot)
    assert all(torch.equal(other.snapshot[k], v) for k, v in cb.snapshot.items())

    # resuming before the final round (transition after resume) and inside it (re-freezing)
    # ends exactly where the uninterrupted run ended
    for path in paths.values():
        resumed = TinyModule()
        cb2 = SparsityCallback(
            SparseConfig(l0=1.0, search_rounds=2, rewind_fraction=0.5, final_temp=50.0)
        )
        trainer(6, [cb2]).fit(resumed, loader(), ckpt_path=path)
        assert cb2.current_round == 2
        for (k, v), (k2, v2) in zip(
            full.net.state_dict().items(), resumed.net.state_dict().items(), strict=True
        ):
            assert k == k2 and torch.equal(v, v2), (path, k)
        assert all(not p.requires_grad for p in mask_parameters(resumed.net))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"search_rounds": -1}, "loss.sparse.search_rounds"),
        ({"final_temp": 0.5}, "loss.sparse.final_temp"),
        ({"rewind_fraction": 1.0}, "loss.sparse.rewind_fraction"),
        ({"rewind_fraction": -0.1}, "loss.sparse.rewind_fraction"),
        ({"search_rounds": 0, "mask_init": 0.0}, "loss.sparse.mask_init"),
        ({"l0": -1.0}, "loss.sparse.l0"),
        ({"mask_lr": 0.0}, "loss.sparse.mask_lr"),
    ],
)
def test_impossible_settings_raise_config_errors(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        SparsityCallback(SparseConfig(**({"l0": 1.0} | kwargs)))
    assert "\n" not in str(err.value)


# --- the schedule is defined on steps ---------------------------------------------------------
@pytest.mark.parametrize("total", [7, 60, 397, 6000, 60001])
@pytest.mark.parametrize("search_rounds", [1, 2])
def test_schedule_rounds_and_rewind_land_on_the_same_fractions_for_any_size(total, search_rounds):
    config = SparseConfig(l0=1.0, search_rounds=search_rounds, rewind_fraction=0.1)
    schedule, warnings = plan_schedule(total, config)
    assert not warnings and schedule.total == total
    rounds = search_rounds + 1
    assert schedule.round_steps == total // rounds
    starts = [r * schedule.round_steps for r in range(rounds)]
    for r, start in enumerate(starts):  # every round starts where it should ...
        assert schedule.round_of(start) == r and (
            start == 0 or schedule.round_of(start - 1) == r - 1
        )
    assert schedule.round_of(total - 1) == search_rounds  # ... and the final one runs to the end
    assert schedule.rewind_step == int(0.1 * schedule.round_steps)
    assert schedule.progress(0) == 0.0
    assert schedule.progress(schedule.round_steps - 1) == pytest.approx(1.0)


def test_smoke_budgets_shrink_the_schedule_with_a_warning():
    config = SparseConfig(l0=1.0, search_rounds=2)
    schedule, warnings = plan_schedule(1, config)
    assert schedule.search_rounds == 0 and "shrunk" in warnings[0]
    schedule, warnings = plan_schedule(5, config)
    assert schedule.search_rounds == 1 and schedule.round_steps == 2 and warnings
    _, warnings = plan_schedule(400, config, min_round_steps=1000)
    assert "min_round_steps" in warnings[0]


def test_the_schedule_follows_max_steps_across_epochs() -> None:
    """A step budget (max_steps, unlimited epochs): rounds switch mid-epoch, on the step."""
    module = TinyModule()
    cb = SparsityCallback(SparseConfig(l0=1.0, search_rounds=1, rewind_fraction=0.25))
    rounds: list[tuple[int, int]] = []

    class Rounds(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            rounds.append((trainer.global_step, cb.current_round))

    pl.Trainer(
        accelerator="cpu",
        max_steps=10,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb, Rounds()],
    ).fit(module, loader())  # 4 batches per epoch
    assert cb.schedule.total == 10 and cb.schedule.round_steps == 5 and cb.schedule.rewind_step == 1
    assert [r for _, r in rounds] == [0] * 5 + [1] * 5
    assert all(bool(m.hard) for _, m in masks(module.net))
