"""hdl-verify and hdl-export: the exported network computes what the masked one does with its dead
units and channels gone, unsupported networks are refused, and both commands run end to end on
a tiny trained run (whose certified accuracy hdl-compare then shows)."""

import json

import pytest
import torch
from torch import nn

from hdl.errors import ConfigError
from hdl.export import export_network, load_exported, save_exported, sparse_path
from hdl.models.cnn import CNN
from hdl.models.mlp import MLP
from hdl.sparsity import add_masks, masks, parameter_counts, set_hard


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks: one thread is faster, and immune to a busy second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hard_masks(model, kill_rows=(), kill_cols=(), p_keep=0.6, seed=0):
    """Random hard masks, plus whole units killed: ``kill_rows`` = [(weight name, unit)] loses
    every incoming weight, ``kill_cols`` = [(weight name, input unit)] every outgoing one."""
    add_masks(model, init=0.1)
    g = torch.Generator().manual_seed(seed)
    found = dict(masks(model))
    with torch.no_grad():
        for mask in found.values():
            keep = torch.rand(mask.logits.shape, generator=g) < p_keep
            mask.logits.copy_(torch.where(keep, 1.0, -1.0))
        for name, unit in kill_rows:
            found[name].logits[unit] = -1.0
        for name, unit in kill_cols:
            found[name].logits[:, unit] = -1.0
    set_hard(model)
    return model.eval()


def randomise_batch_norm(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()


def assert_same_outputs(a, b, x):
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert (ya - yb).abs().max() <= 1e-5 * max(1.0, float(ya.abs().max()))


# --- export -------------------------------------------------------------------------------------
def test_mlp_export_removes_dead_units_and_computes_the_same():
    torch.manual_seed(0)
    model = MLP((6,), 3, hidden=(16, 12), batch_norm=True)
    randomise_batch_norm(model)
    # units 0, 1 of body.0 lose every input (constant: folded into the next bias); unit 5 of
    # body.0 and unit 2 of body.3 lose every output (removed outright)
    hard_masks(
        model,
        kill_rows=[("body.0.weight", 0), ("body.0.weight", 1)],
        kill_cols=[("body.3.weight", 5), ("head.weight", 2)],
    )
    x = torch.randn(64, 6)
    exported, removed = export_network(model, (6,))
    assert_same_outputs(model, exported, x)
    assert removed["body.0+body.1"] >= 3 and removed["body.3+body.4"] >= 1
    assert not any(isinstance(m, nn.BatchNorm1d) for m in exported.modules())  # folded
    linears = [m for m in exported if isinstance(m, nn.Linear)]
    assert linears[0].out_features <= 13 and linears[1].out_features <= 11
    total, _ = parameter_counts(model)
    assert sum(p.numel() for p in exported.parameters()) < total
    # no exported hidden unit is dead any more
    for a, b in zip(linears, linears[1:], strict=False):
        assert (a.weight != 0).any(dim=1).all() and (b.weight != 0).any(dim=0).all()
    assert_same_outputs(exported, sparse_path(exported), x)  # the CSR path


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_cnn_export_removes_dead_channels_and_computes_the_same(pooling, tmp_path):
    torch.manual_seed(0)
    model = CNN(
        (1, 10, 10),
        4,
        channels=(6, 5),
        hidden=(10,),
        pooling=pooling,
        batch_norm=True,
        normalize={"mean": 0.2, "std": 0.3},
    )
    randomise_batch_norm(model)
    hard_masks(
        model,
        # channel 0 of conv 1: no input (a constant through ReLU, pooling and the zero padding
        # of conv 2: a position-dependent constant); channel 1 of conv 2: no input (a constant
        # block of the flattened features); channel 3 of conv 1: no output
        kill_rows=[("features.0.weight", 0), ("features.4.weight", 1)],
        kill_cols=[("features.4.weight", 3)],
    )
    x = torch.rand(32, 1, 10, 10)
    exported, removed = export_network(model, (1, 10, 10))
    assert_same_outputs(model, exported, x)
    convs = [m for m in exported if isinstance(m, nn.Conv2d)]
    assert convs[0].out_channels <= 4 and convs[1].out_channels <= 4
    assert removed["features.0+features.1"] >= 2 and removed["features.4+features.5"] >= 1
    # channel counts kept at a multiple of 4: some dead channels stay, the function is the same
    padded, _ = export_network(model, (1, 10, 10), channel_multiple=4)
    assert_same_outputs(model, padded, x)
    assert all(
        m.out_channels % 4 == 0 or m.out_channels in (6, 5)
        for m in padded
        if isinstance(m, nn.Conv2d)
    )
    # the saved spec reloads without pickled code, and runs the same
    save_exported(exported, tmp_path / "model.pt", (1, 10, 10))
    reloaded = load_exported(tmp_path / "model.pt")
    assert_same_outputs(exported, reloaded, x)


def test_export_of_two_dimensional_images_and_whole_dead_layers():
    torch.manual_seed(0)
    model = CNN((8, 8), 3, channels=(4,), hidden=(6,), pool_every=0)
    hard_masks(model, kill_rows=[("body.0.weight", u) for u in range(6)])  # the whole layer
    x = torch.rand(16, 8, 8)
    exported, _ = export_network(model, (8, 8))
    assert_same_outputs(model, exported, x)
    assert [m for m in exported if isinstance(m, nn.Linear)][0].out_features == 1


def test_unsupported_networks_are_refused():
    from hdl.models.rnn import RNN

    with pytest.raises(ConfigError, match="cannot export RNN.*LSTM"):
        export_network(RNN((6, 4), 3), (6, 4))
    with pytest.raises(ConfigError, match=r"cannot export layer 1 \(Softmax\)"):
        export_network(nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=1)), (3,))


# --- the commands, end to end -----------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny MLP on iris (standardised features: an unbounded box) trained with the certified
    loss and the sparsity term at once (masked weights in the checkpoint)."""
    from tests.test_train import SPARSE_TINY, run_in_process

    run_dir = tmp_path_factory.mktemp("certified_run")
    run_in_process(
        ["data=iris", "loss=certified", "loss.robust.ramp_steps=6", *SPARSE_TINY], run_dir
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert metrics["sparsity/zero_fraction"] > 0 and "train/robust" in metrics
    return run_dir


def test_hdl_verify_cli_writes_certified_accuracy(trained_run, capsys):
    from hdl.keys import metric_key
    from hdl.verify import main

    main([str(trained_run), "--eps", "0.05,0.2", "--steps", "10"])
    assert "certified accuracy" in capsys.readouterr().out
    report = json.loads((trained_run / "verify.json").read_text())
    metrics = json.loads((trained_run / "metrics.json").read_text())["metrics"]
    assert report["natural_accuracy"] == pytest.approx(metrics["test/acc"])
    assert report["warnings"] == []
    for eps in ("0.05", "0.2"):
        row = report["results"][eps]
        ibp, crown = row["ibp"]["certified_accuracy"], row["crown"]["certified_accuracy"]
        assert ibp <= crown <= row["pgd"]["accuracy"] <= report["natural_accuracy"]
        assert set(row["crown"]["unstable_relus"]) == {"body.1", "body.3"}
        assert row["ibp"]["seconds_per_example"] > 0
        assert report["metrics"][metric_key("eval", "crown", "acc", float(eps))] == crown
    assert report["box"] is None  # standardised features


def test_hdl_compare_shows_certified_accuracy(trained_run):
    from hdl.compare import run_compare

    if not (trained_run / "verify.json").is_file():
        from hdl.verify import verify_run

        verify_run(trained_run, eps=[0.05, 0.2], steps=10)
    summary = run_compare([trained_run], out=trained_run / "cmp", plots=False)
    header = summary["header"]
    assert "certified ibp acc@0.05 %" in header and "certified crown acc@0.2 %" in header
    assert not any(h.startswith("eval ibp") for h in header)


def test_hdl_export_cli_writes_a_smaller_equal_network(trained_run, capsys):
    from hdl.export import main

    main([str(trained_run), "--repeats", "3"])
    out = capsys.readouterr().out
    assert "agrees" in out
    report = json.loads((trained_run / "export" / "export.json").read_text())
    assert report["check"]["agrees"] and report["check"]["reloaded_max_abs_diff"] == 0.0
    assert report["check"]["torchscript_max_abs_diff"] <= 1e-5
    assert report["check"]["dense_max_abs_diff"] <= 1e-5
    assert report["exported"]["parameters"] <= report["dense"]["parameters"]
    assert report["exported"]["nonzero_parameters"] <= report["dense"]["nonzero_parameters"]
    for key in ("dense", "exported"):
        assert set(report[key]["latency_ms"]) == {"1", "256"}
    assert (trained_run / "export" / "model.pt").is_file()
    assert (trained_run / "export" / "model.ts").is_file()
    assert "faster_than_exported" in report["csr_linear"]


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    from hdl.export import main as export_main
    from hdl.verify import main as verify_main

    for main in (verify_main, export_main):
        with pytest.raises(SystemExit) as exc:
            main([str(tmp_path / "nope")])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.strip().count("\n") == 0
