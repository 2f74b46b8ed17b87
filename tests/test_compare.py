"""hdl-compare on tiny runs made here, plus the Pareto / preference logic on known points."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from hdl.compare import (
    discover,
    group_runs,
    pareto_front,
    parse_preferences,
    recommend,
    run_compare,
)
from hdl.errors import ConfigError, DataError
from tests.test_train import run_in_process


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two variants (baseline, stable) x two split seeds, as a sweep directory would hold."""
    root = tmp_path_factory.mktemp("sweep")
    for i, (loss, split) in enumerate([(lo, s) for lo in ("baseline", "stable") for s in (0, 1)]):
        run_in_process(
            [f"loss={loss}", "data=iris", f"data.split_seed={split}", "trainer.max_epochs=2"],
            root / f"{i}_loss={loss},data.split_seed={split}",
        )
    return root


def test_runs_group_by_everything_but_the_split(sweep):
    groups = group_runs(discover([sweep]))
    assert sorted(groups) == ["baseline", "stable"]
    for runs in groups.values():
        assert sorted(r.config["data.split_seed"] for r in runs) == [0, 1]


def test_compare_writes_tables_and_plots(sweep, tmp_path):
    out = tmp_path / "cmp"
    summary = run_compare([sweep], out, prefer="accuracy=1,stability=1")
    assert summary["runs"] == 4
    md = (out / "comparison.md").read_text()
    assert md.startswith("| variant | runs | test acc % | pgd acc@0.1 % | pgd acc@0.5 % |")
    assert "| baseline | 2 |" in md and "| stable | 2 |" in md
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    by_label = {r["variant"]: r for r in rows}
    # mean ± std over splits, recomputed from the runs' own metrics.json files
    accs = [
        json.loads(p.read_text())["metrics"]["test/acc"]
        for p in sweep.glob("*loss=stable*/metrics.json")
    ]
    assert float(by_label["stable"]["test/acc mean"]) == pytest.approx(sum(accs) / 2)
    assert float(by_label["stable"]["test/acc std"]) == pytest.approx(
        abs(accs[0] - accs[1]) / math.sqrt(2)
    )
    # stability across the two splits was measured from predictions.npz and weights.npz
    for label in ("baseline", "stable"):
        assert 0.0 <= float(by_label[label]["stability/gini"]) <= 0.5
        assert float(by_label[label]["stability/weight_std"]) > 0
    for name in ("accuracy_vs_eps", "sparsity_per_layer", "spread_across_splits", "axes_radar"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert summary["recommended"][0][0] in summary["pareto_front"]


def test_pareto_front_and_preferences():
    points = {
        "baseline": {"accuracy": 0.95, "robustness": 0.2, "sparsity": 0.0, "stability": 0.9},
        "robust": {"accuracy": 0.93, "robustness": 0.6, "sparsity": 0.0, "stability": 0.9},
        "worse": {"accuracy": 0.90, "robustness": 0.5, "sparsity": 0.0, "stability": 0.8},
        "sparse": {"accuracy": 0.94, "robustness": 0.2, "sparsity": 0.7, "stability": 0.9},
    }
    assert sorted(pareto_front(points)) == ["baseline", "robust", "sparse"]
    assert recommend(points, parse_preferences("robustness=1"))[0][0] == "robust"
    assert recommend(points, parse_preferences("sparsity=2,accuracy=1"))[0][0] == "sparse"
    assert recommend(points, parse_preferences("accuracy=1"))[0][0] == "baseline"
    assert "worse" not in [label for label, _ in recommend(points, parse_preferences(None))]


@pytest.mark.parametrize("text", ["speed=1", "accuracy=x", "accuracy=-1", "accuracy=0"])
def test_bad_preferences_name_the_problem(text):
    with pytest.raises(ConfigError, match="--prefer"):
        parse_preferences(text)


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no runs"):
        discover([tmp_path])
    exe = Path(sys.executable).with_name("hdl-compare")
    proc = subprocess.run([str(exe), str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no runs" in proc.stderr


def test_the_shipped_comparison_sweep_runs_and_compares(tmp_path):
    """sweeps/baseline_vs_holistic.yaml as documented, narrowed to 2 presets x 2 splits."""
    repo = Path(__file__).resolve().parent.parent
    bin_dir = Path(sys.executable).parent
    sweep = tmp_path / "sweep"
    cmd = [
        str(bin_dir / "hdl-train"),
        "-m",
        "--config-dir",
        str(repo / "sweeps"),
        "--config-name",
        "baseline_vs_holistic",
        "loss=baseline,holistic",
        "data.split_seed=0,1",
        "trainer.max_epochs=4",  # two sparsity rounds of 2 epochs (rewind after epoch 1)
        "eval.steps=3",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    assert sorted((m["loss"], m["split_seed"]) for m in metrics) == [
        ("baseline", 0),
        ("baseline", 1),
        ("holistic", 0),
        ("holistic", 1),
    ]
    assert all(m["data"] == "breast_cancer" for m in metrics)
    proc = subprocess.run(
        [str(bin_dir / "hdl-compare"), str(sweep)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (sweep / "comparison" / "comparison.md").read_text()
    assert "| baseline | 2 |" in md and "| holistic | 2 |" in md
    assert "square acc@0.4" in md  # the gradient-free check ran at the largest eps
