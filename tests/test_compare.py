"""hdl-compare on tiny runs made here, plus the Pareto / preference logic on known points."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hdl.compare import (
    axes,
    compare,
    discover,
    group_runs,
    pareto_front,
    parse_preferences,
    recommend,
    run_compare,
    table_rows,
)
from hdl.errors import ConfigError, DataError
from hdl.stability import prediction_stability, weight_stability
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
        assert by_label[label]["stability/over"] == "splits"
        assert 0.0 <= float(by_label[label]["stability/split/gini"]) <= 0.5
        assert 0.0 <= float(by_label[label]["stability/split/prob_std"]) <= math.sqrt(0.5)
        assert float(by_label[label]["stability/split/weight_std"]) > 0
        assert float(by_label[label]["stability/split/weight_cv"]) > 0
        assert "stability/seed/gini" not in by_label[label]  # one init seed: nothing to compare
    assert "- **label gini**:" in md  # the legend under the table
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
    assert "square (1000 q) acc@0.4" in md  # the cheap gradient-free check, largest eps


# --- split vs init-seed stability, on hand-made run directories -------------------------------
def fake_run(root, seed, split, logits, targets, weights, loss="baseline", task="classification"):
    """A run directory as hdl-train writes it, with chosen predictions and weights."""
    run_dir = root / f"{loss}_seed={seed}_split={split}"
    run_dir.mkdir(parents=True)
    config = {"seed": seed, "data": {"name": "toy", "seed": 0, "split_seed": split}}
    config["loss"] = {"name": loss}
    meta = {"task": task, "metrics": {"test/acc": 0.5}, "config": config, "sparsity": {}}
    (run_dir / "metrics.json").write_text(json.dumps(meta))
    np.savez(run_dir / "predictions.npz", logits=logits.astype(np.float16), targets=targets)
    np.savez(run_dir / "weights.npz", **weights)
    return run_dir


def fake_outputs(rng, n=40, c=3):
    logits = rng.normal(size=(n, c)).astype(np.float16)
    return logits, {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3)}


def expected(outputs, targets):
    """What hdl.stability says about exactly these runs."""
    out = prediction_stability(np.stack([o[0] for o in outputs]), targets, "classification")
    out |= weight_stability([o[1] for o in outputs])
    out.pop("runs")
    return out


def only(variant, kind):
    """One kind's stability metrics (``split/...`` or ``seed/...``) without the run counts."""
    prefix = f"{kind}/"
    return {
        k[len(prefix) :]: x
        for k, x in variant.stability.items()
        if k.startswith(prefix) and k[len(prefix) :] not in ("runs", "groups")
    }


def test_split_and_init_seed_stability_are_not_pooled(tmp_path):
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 40)
    runs = {(0, 0): fake_outputs(rng), (0, 1): fake_outputs(rng), (1, 0): fake_outputs(rng)}
    for (seed, split), (logits, weights) in runs.items():
        fake_run(tmp_path / "runs", seed, split, logits, targets, weights)
    (variant,) = compare(discover([tmp_path / "runs"]))
    assert len(variant.runs) == 3
    # over splits: the two runs with seed 0; over init seeds: the two runs with split 0
    assert only(variant, "split") == pytest.approx(expected([runs[0, 0], runs[0, 1]], targets))
    assert only(variant, "seed") == pytest.approx(expected([runs[0, 0], runs[1, 0]], targets))
    assert variant.stability_kinds == ["split", "seed"]
    assert variant.stability["split/runs"] == 2 and variant.stability["seed/runs"] == 2
    assert only(variant, "split")["gini"] != pytest.approx(only(variant, "seed")["gini"])

    summary = run_compare([tmp_path / "runs"], tmp_path / "cmp", plots=False)
    header, (row,) = summary["header"], summary["rows"]
    cells = dict(zip(header, row, strict=True))
    assert cells["stability over"] == "splits / init seeds"
    split, seed = variant.stability["split/gini"], variant.stability["seed/gini"]
    assert cells["label gini"] == f"{split:.4f} / {seed:.4f}"
    assert "prob std" in header and "weight CV" in header
    (record,) = list(csv.DictReader((tmp_path / "cmp" / "comparison.csv").open()))
    assert float(record["stability/split/gini"]) == pytest.approx(split)
    assert float(record["stability/seed/gini"]) == pytest.approx(seed)
    assert "stability/gini" not in record  # no unlabelled stability
    assert record["stability/over"] == "splits / init seeds"
    assert record["axis/stability_over"] == "splits"
    assert float(record["axis/stability"]) == pytest.approx(1 - split)
    info = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["variants"]["baseline"]
    assert info["stability_over"] == ["splits", "init seeds"]
    assert info["stability_axis_over"] == "splits"
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| stability over | min acc % | label gini | logit std | prob std |" in md
    assert "- **label gini**: mean over test examples of the Gini impurity" in md
    assert "- **weight CV**:" in md and "- **stability over**:" in md


def test_stability_subgroups_are_averaged_by_run_count(tmp_path):
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 3, 40)
    grid = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]  # seed 0: three splits, seed 1: two
    runs = {key: fake_outputs(rng) for key in grid}
    for (seed, split), (logits, weights) in runs.items():
        fake_run(tmp_path, seed, split, logits, targets, weights)
    (variant,) = compare(discover([tmp_path]))
    seed0 = expected([runs[0, s] for s in (0, 1, 2)], targets)
    seed1 = expected([runs[1, s] for s in (0, 1)], targets)
    want = {k: (3 * seed0[k] + 2 * seed1[k]) / 5 for k in seed0}
    assert only(variant, "split") == pytest.approx(want)
    assert variant.stability["split/runs"] == 5 and variant.stability["split/groups"] == 2
    # over init seeds: splits 0 and 1 have two seeds each, split 2 only one (left out)
    split0 = expected([runs[0, 0], runs[1, 0]], targets)
    split1 = expected([runs[0, 1], runs[1, 1]], targets)
    assert only(variant, "seed") == pytest.approx({k: (split0[k] + split1[k]) / 2 for k in split0})
    assert variant.stability["seed/runs"] == 4 and variant.stability["seed/groups"] == 2


def test_only_split_seeds_vary_is_unchanged(tmp_path):
    """The common case: one init seed, so split stability is that of all the runs, exactly."""
    rng = np.random.default_rng(2)
    targets = rng.integers(0, 3, 40)
    outputs = [fake_outputs(rng) for _ in range(3)]
    for split, (logits, weights) in enumerate(outputs):
        fake_run(tmp_path, 0, split, logits, targets, weights)
    (variant,) = compare(discover([tmp_path]))
    assert only(variant, "split") == expected(outputs, targets)  # exactly, not approximately
    assert variant.stability_kinds == ["split"]
    assert axes(variant)["stability"] == 1 - variant.stability["split/gini"]
    header, (row,) = table_rows([variant])[:2]
    assert dict(zip(header, row, strict=True))["stability over"] == "splits"


def test_only_init_seeds_vary_gives_init_seed_stability(tmp_path):
    rng = np.random.default_rng(3)
    targets = rng.integers(0, 3, 40)
    outputs = [fake_outputs(rng) for _ in range(3)]
    for seed, (logits, weights) in enumerate(outputs):
        fake_run(tmp_path, seed, 0, logits, targets, weights)
    (variant,) = compare(discover([tmp_path]))
    assert only(variant, "seed") == pytest.approx(expected(outputs, targets))
    assert variant.stability_kinds == ["seed"]
    header, (row,), (record,) = table_rows([variant])
    assert dict(zip(header, row, strict=True))["stability over"] == "init seeds"
    assert record["axis/stability_over"] == "init seeds"
    assert record["axis/stability"] == pytest.approx(1 - variant.stability["seed/gini"])


def test_runs_that_share_neither_seed_nor_split_have_no_stability(tmp_path):
    rng = np.random.default_rng(4)
    targets = rng.integers(0, 3, 40)
    for seed, split in [(0, 0), (1, 1)]:
        logits, weights = fake_outputs(rng)
        fake_run(tmp_path, seed, split, logits, targets, weights)
    (variant,) = compare(discover([tmp_path]))
    assert variant.stability == {} and math.isnan(axes(variant)["stability"])
    assert any("not pooled" in w for w in variant.warnings)
    header, (row,) = table_rows([variant])[:2]
    assert dict(zip(header, row, strict=True))["stability over"] == "–"


def test_regression_table_shows_scale_free_prediction_spread(tmp_path):
    rng = np.random.default_rng(5)
    targets = rng.normal(size=30)
    for split in range(2):
        preds = (targets + 0.1 * rng.normal(size=30))[:, None]
        fake_run(tmp_path, 0, split, preds, targets, fake_outputs(rng)[1], task="regression")
    summary = run_compare([tmp_path], tmp_path / "cmp", plots=False)
    cells = dict(zip(summary["header"], summary["rows"][0], strict=True))
    assert cells["stability over"] == "splits"
    rel = summary["table"][0]["stability/split/prediction_std_rel"]
    assert cells["pred std / target std"] == f"{rel:.4f}"
    assert "- **pred std / target std**:" in summary["markdown"]
