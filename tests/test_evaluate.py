"""hdl-eval: attack evaluation, its sanity checks, the sparsity report, and a real run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hdl.errors import ConfigError
from hdl.evaluate import evaluate_run
from hdl.robustness import parse_attack, robustness, sanity_checks
from hdl.sparsity_report import sparsity_report
from tests.test_train import run_in_process


@pytest.fixture(scope="module")
def separable():
    """A small MLP trained to ~100 % on two well-separated 2-D blobs (unbounded features)."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(100, 2, generator=g) - 2, torch.randn(100, 2, generator=g) + 2])
    y = torch.cat([torch.zeros(100), torch.ones(100)]).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


def test_accuracy_falls_with_eps_and_reaches_chance(separable):
    model, x, y = separable
    results = robustness(
        model, x, y, attacks=["pgd", "fgsm"], eps=[0.5, 1.5, 10.0], l2_eps=[], steps=20
    )
    for attack in ("pgd_linf", "fgsm_linf"):
        acc = [results[attack][e]["accuracy"] for e in ("0", "0.5", "1.5", "10")]
        assert acc[0] > 0.95
        assert all(a >= b for a, b in zip(acc, acc[1:], strict=False)), acc
        assert acc[-1] <= 0.55  # chance on balanced classes
    assert results["pgd_linf"]["1.5"]["accuracy"] <= results["fgsm_linf"]["1.5"]["accuracy"]
    assert sanity_checks(results, "classification", len(y), chance=0.5, chance_eps=10.0) == []


def test_sanity_checks_flag_dishonest_results():
    bad = {
        "pgd_linf": {"0": {"accuracy": 0.9}, "0.1": {"accuracy": 0.5}, "0.3": {"accuracy": 0.6}},
        "fgsm_linf": {"0": {"accuracy": 0.9}, "0.1": {"accuracy": 0.3}, "0.3": {"accuracy": 0.2}},
        "square_linf": {"0.3": {"accuracy": 0.1}},
    }
    warnings = sanity_checks(bad, "classification", 100, chance=0.1, chance_eps=0.3)
    text = "\n".join(warnings)
    assert "pgd_linf: accuracy at eps=0.3" in text  # not monotone
    assert "weaker than FGSM" in text
    assert "gradient masking" in text
    assert "stays above chance" in text  # pgd at the chance radius: 0.6 > 0.1


def test_parse_attack():
    assert parse_attack("pgd") == ("pgd", "inf")
    assert parse_attack("pgd_l2") == ("pgd", "2")
    assert parse_attack("fgsm_rs") == ("fgsm_rs", "inf")
    assert parse_attack("apgd_linf") == ("apgd", "inf")
    with pytest.raises(ConfigError, match="unknown attack"):
        parse_attack("cw")


def test_sparsity_report_counts_dead_units_and_unused_inputs():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight[1].zero_()  # unit 1 of layer 0 has no input: dead
        net[0].weight[:, 2].zero_()  # input feature 2 is read by no unit
        net[0].bias.fill_(-100.0)  # every hidden unit is off for moderate inputs
    report = sparsity_report(net, torch.randn(8, 4))
    assert report["dead_units"] == 1
    assert report["unused_input_features"] == 1
    assert report["layers"]["0.weight"]["zero_fraction"] == pytest.approx(6 / 12)
    assert report["parameters"] == 4 * 3 + 3 + 3 * 2 + 2
    assert report["effective_parameters"] == report["parameters"] - 6
    assert report["inactive_units"] == 3


def test_evaluate_run_writes_eval_json(tmp_path):
    run_in_process(["loss=sparse", "data=iris", "loss.sparse.rewind_fraction=0"], tmp_path)
    report = evaluate_run(tmp_path, attacks=["pgd", "fgsm", "pgd_l2"], steps=5)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["robustness"].keys() == {"pgd_linf", "fgsm_linf", "pgd_l2"}
    assert saved["chance_eps"] == 10.0  # standardised iris features are unbounded
    assert "10" in saved["robustness"]["pgd_linf"]
    # the reloaded network has the trained, masked weights: same zeros as the run reported
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert report["sparsity"]["zero_fraction"] == pytest.approx(
        metrics["metrics"]["sparsity/zero_fraction"]
    )
    assert report["robustness"]["pgd_linf"]["0"]["accuracy"] == pytest.approx(
        metrics["metrics"]["test/acc"]
    )


def test_cli_missing_run_is_one_line(tmp_path):
    exe = Path(sys.executable).with_name("hdl-eval")
    proc = subprocess.run([str(exe), str(tmp_path / "nope")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope" in proc.stderr


def test_test_loop_runs_square_at_the_largest_eps(tmp_path):
    metrics = run_in_process(["data=iris", "eval.square_check=true", "eval.steps=3"], tmp_path)
    m = metrics["metrics"]
    assert 0.0 <= m["test/square_acc@0.5"] <= m["test/acc"]


def test_compare_flags_square_beating_pgd():
    from hdl.compare import _gradient_masking

    stats = {"test/pgd_acc@0.3": (0.6, 0.0), "test/square_acc@0.3": (0.2, 0.0)}
    assert "gradient masking" in _gradient_masking(stats, "acc", 100)[0]
    stats["test/square_acc@0.3"] = (0.6, 0.0)
    assert _gradient_masking(stats, "acc", 100) == []


def test_evaluate_a_run_that_has_only_its_hydra_config(tmp_path):
    """A run stopped before metrics.json: the config comes from .hydra/config.yaml, whose
    ${now:...} and ${hydra:...} interpolations cannot resolve outside the Hydra app."""
    from omegaconf import OmegaConf

    from tests.conftest import TINY, compose

    overrides = ["data=iris", "trainer.max_epochs=2", "test=false"]
    run_in_process(overrides, tmp_path)
    (tmp_path / "metrics.json").unlink()
    cfg = compose(TINY + overrides, tmp_path)
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")  # interpolations kept
    assert "${now:" in (tmp_path / ".hydra" / "config.yaml").read_text()
    report = evaluate_run(tmp_path, attacks=["pgd"], steps=2, write=False)
    assert 0.0 <= report["robustness"]["pgd_linf"]["0.1"]["accuracy"] <= 1.0
