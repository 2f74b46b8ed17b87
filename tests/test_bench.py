"""hdl-bench: the CLI with tiny settings, and the exact-term implementations it compares."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from hdl.bench import format_table, topk_error
from hdl.bench_exact import OPTIONS
from hdl.losses import RobustConfig, robust_cross_entropy

TINY = [
    "threads=1",
    "batch_size=16",
    "warmup=1",
    "repeats=2",
    "presets.mlp.input_shape=[12]",
    "presets.mlp.overrides.hidden=[8]",
    "+variants.pgd7_at.robust.steps=2",
    "scaling.classes=[2,3]",
    "scaling.input_sizes=[6]",
    "scaling.hidden=[8]",
    "scaling.repeats=2",
    "exact_options.options=[diff_batched,diff_loop,class_loop,func_jacrev]",
    "overhead.n_examples=128",
    "overhead.features=6",
    "overhead.hidden=[8]",
    "overhead.batch_sizes=[64]",
    "overhead.rounds=1",
    "stacked.members=[1,3]",
    "stacked.variants=[plain,holistic]",
    "stacked.batch_size=8",
    "stacked.features=6",
    "stacked.hidden=[8]",
    "stacked.repeats=2",
]


def test_hdl_bench_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "hdl.bench", *TINY, f"output={out}", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    names = [r["variant"] for r in result["variants"]]
    assert names[0] == "plain" and {"exact_linf", "topk2", "holistic", "fgsm_rs_at"} <= set(names)
    for row in result["variants"]:
        assert "error" not in row, row
        assert row["ms"] > 0 and row["peak_mb"] > 0
        assert row["variant"] in proc.stdout
    stacked = {(r["variant"], r["members"]): r for r in result["stacked"]}
    assert set(stacked) == {("plain", 1), ("plain", 3), ("holistic", 1), ("holistic", 3)}
    assert all(r["separate_ms"] > 0 and r["stacked_ms"] > 0 for r in stacked.values())
    assert "stacked training" in proc.stdout
    assert result["variants"][0]["ratio"] == pytest.approx(1.0)
    topk = {r["variant"]: r["topk_rel_error"] for r in result["variants"] if "topk_rel_error" in r}
    assert set(topk) == {"topk1", "topk2", "topk3"} and all(e >= 0 for e in topk.values())
    assert [(r["classes"], r["input_size"]) for r in result["scaling"]] == [(2, 6), (3, 6)]
    assert "topk1_ratio" in result["scaling"][1] and "topk1_ratio" not in result["scaling"][0]
    for row in result["exact_options"]:
        assert row["max_abs_diff"] < 1e-5 and row["ms"] > 0
    assert result["overhead"][0]["ratio"] > 0
    assert "x plain" in proc.stdout and str(out) in proc.stdout


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_exact_options_agree_with_the_library(norm):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5))
    x, y = torch.randn(10, 6), torch.randint(0, 5, (10,))
    p = float("inf") if norm == "inf" else 2.0
    expected = robust_cross_entropy(net, x, y, 0.1, norm)
    for name, fn in OPTIONS.items():
        if name != "compiled":  # torch.compile has no double backward (the bench reports it)
            torch.testing.assert_close(fn(net, x, y, 0.1, p), expected, msg=name)


def test_topk_error_is_zero_when_k_covers_every_class():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(10, 6), torch.randint(0, 4, (10,))
    assert topk_error(net, x, y, RobustConfig(eps=0.1, top_k=3)) == pytest.approx(0.0, abs=1e-7)
    assert topk_error(net, x, y, RobustConfig(eps=0.1, top_k=1)) > 0


def test_format_table_aligns_columns():
    text = format_table(
        [{"a": "x", "b": 1.5}, {"a": "long", "b": float("nan")}],
        [("a", "name", ""), ("b", "value", ".1f")],
    )
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1 and lines[3].endswith("-")
