"""Stacked training (hdl/stacked.py, hdl/stacked_run.py, hdl/stacking.py, hydra/launcher=stacked):
a member of a stacked job ends where the same configuration run alone ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hdl.errors import ConfigError
from tests.conftest import compose

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "logger=csv",
    "trainer=cpu",
    "print_metrics=false",
    "~callbacks.progress_bar",
    "budget.steps=30",
    "budget.val_checks=3",
    "eval.eps=[0.1]",
    "eval.steps=5",
    "eval.square_check=false",
]
# member 1 differs from member 0 in split, init seed and the preset's own value
KNOB = {
    "baseline": [],
    "robust": ["loss.robust.eps=0.2"],
    "stable": ["loss.stable.ratio=0.6"],
    "sparse": ["loss.sparse.l0=0.1"],
    "holistic": ["loss.robust.eps=0.2", "loss.sparse.l0=0.1"],
}


def _job(overrides: list[str], run_dir: Path):
    from hdl.stacked_run import resolved_task

    return resolved_task(compose([*FAST, *overrides], run_dir)), run_dir


def _members(tmp_path: Path, base: list[str], loss: str, tag: str):
    return [
        _job([*base, f"loss={loss}", "data.split_seed=0", "seed=0"], tmp_path / f"{tag}0"),
        _job(
            [*base, f"loss={loss}", "data.split_seed=1", "seed=1", *KNOB[loss]],
            tmp_path / f"{tag}1",
        ),
    ]


def _compare(stacked: dict, alone: dict, run_dirs: tuple[Path, Path], weight_atol: float):
    keys = [k for k in alone["metrics"] if k.startswith(("test/", "val/", "params/"))]
    assert keys and any(k.startswith("test/pgd") for k in keys)
    for key in keys:
        assert stacked["metrics"][key] == pytest.approx(alone["metrics"][key], abs=1e-6), key
    assert stacked["selected"]["step"] == alone["selected"]["step"]
    a = np.load(run_dirs[0] / "weights.npz")
    b = np.load(run_dirs[1] / "weights.npz")
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        np.testing.assert_allclose(a[name], b[name], atol=weight_atol, rtol=0)
    for name in ("metrics.json", "predictions.npz", "weights.npz", "selected.ckpt"):
        assert (run_dirs[0] / name).is_file(), name
    assert stacked["stacked"]["members"] == 2


@pytest.mark.parametrize("loss", ["baseline", "robust", "stable", "sparse", "holistic"])
def test_mlp_member_equals_the_run_alone(tmp_path, loss):
    from hdl.runner import run
    from hdl.stacked_run import run_stacked

    base = ["data=breast_cancer", "model.hidden=[16,16]"]
    members = _members(tmp_path, base, loss, "stacked")
    results = run_stacked(members)
    assert all(isinstance(r, dict) for r in results), results
    for i, (cfg, run_dir) in enumerate(_members(tmp_path, base, loss, "alone")):
        alone = run(cfg, run_dir)
        _compare(results[i], alone, (members[i][1], run_dir), weight_atol=1e-5)
    if loss in ("stable", "holistic"):
        assert "train/theta" in results[0]["metrics"]


@pytest.mark.parametrize("loss", ["baseline", "robust", "stable", "sparse", "holistic"])
def test_cnn_member_equals_the_run_alone(tmp_path, loss):
    """Convolutions under vmap round differently from one network's: bounded, not bitwise."""
    from hdl.runner import run
    from hdl.stacked_run import run_stacked

    base = ["data=digits_images", "data.limit=300", "model=cnn", "model.channels=[4,8]"]
    base += ["model.hidden=[16]", "budget.steps=12"]
    members = _members(tmp_path, base, loss, "stacked")
    results = run_stacked(members)
    assert all(isinstance(r, dict) for r in results), results
    for i, (cfg, run_dir) in enumerate(_members(tmp_path, base, loss, "alone")):
        alone = run(cfg, run_dir)
        _compare(results[i], alone, (members[i][1], run_dir), weight_atol=1e-4)


def test_a_relaunched_stacked_job_resumes_from_its_checkpoint(tmp_path):
    """The group's last.ckpt (weights, optimizer, selections, schedule, the members' logs): a
    relaunch of the finished job resumes it and reports the same members."""
    from hdl.stacked_run import run_stacked

    members = _members(tmp_path, ["data=iris"], "holistic", "m")
    group = tmp_path / "group"
    first = run_stacked(members, group_dir=group)
    assert (group / "last.ckpt").is_file()
    rows = (members[0][1] / "csv" / "metrics.csv").read_text().splitlines()
    again = run_stacked(members, group_dir=group)
    for a, b in zip(first, again, strict=True):
        assert b["resumed_from"] == str(group / "last.ckpt")
        assert a["resumed_from"] is None
        assert b["selected"] == a["selected"]
        for key, value in a["metrics"].items():
            if key.startswith("test/"):
                assert b["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert len((members[0][1] / "csv" / "metrics.csv").read_text().splitlines()) >= len(rows)


def test_a_member_resumes_alone_from_its_own_checkpoint(tmp_path):
    """Each member's checkpoints/last.ckpt is a checkpoint of its own run: relaunched alone with
    more epochs (trainer.max_epochs is not part of a run's identity), it continues where the
    stacked job stopped and ends where an uninterrupted run alone ends."""
    from hdl.runner import run
    from hdl.stacked_run import run_stacked

    base = ["data=iris", "loss=stable", "budget.steps=null", "budget.val_checks=1"]

    def member(i: int, epochs: int, folder: str):
        overrides = [*base, f"trainer.max_epochs={epochs}", f"data.split_seed={i}", f"seed={i}"]
        return _job(overrides, tmp_path / folder)

    stacked = [member(0, 3, "m0"), member(1, 3, "m1")]
    run_stacked(stacked)
    assert (tmp_path / "m0" / "checkpoints" / "last.ckpt").is_file()
    resumed = run(*member(0, 6, "m0"))
    alone = run(*member(0, 6, "alone"))
    assert resumed["resumed_from"] == str(tmp_path / "m0" / "checkpoints" / "last.ckpt")
    assert resumed["selected"]["step"] == alone["selected"]["step"]
    for key, value in alone["metrics"].items():
        if key.startswith(("test/", "val/")):
            assert resumed["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert resumed["metrics"]["train/theta"] == pytest.approx(alone["metrics"]["train/theta"])


def test_members_with_their_own_learning_rates(tmp_path):
    """Adam at member 0's rate, each member's update scaled to its own rate: the run alone up
    to the rounding of recovering the update (a few float32 ulps of the weights per step)."""
    from hdl.runner import run
    from hdl.stacked_run import run_stacked

    def jobs(tag: str):
        return [
            _job(["data=breast_cancer", f"optimizer.lr={lr}", f"seed={i}"], tmp_path / f"{tag}{i}")
            for i, lr in enumerate((1e-3, 4e-3))
        ]

    members = jobs("stacked")
    results = run_stacked(members)
    for i, (cfg, run_dir) in enumerate(jobs("alone")):
        alone = run(cfg, run_dir)
        for key in ("test/acc", "test/pgd_acc@0.1", "val/acc"):
            assert results[i]["metrics"][key] == pytest.approx(alone["metrics"][key], abs=0.02)
        a, b = np.load(members[i][1] / "weights.npz"), np.load(run_dir / "weights.npz")
        for name in a.files:
            np.testing.assert_allclose(a[name], b[name], atol=1e-4, rtol=0)


def test_stacked_net_forward_and_robust_gradients_are_each_members():
    """The math, directly: outputs, the robust loss and its weight gradients of each member."""
    from hdl.losses import HolisticLoss
    from hdl.models.mlp import MLP
    from hdl.sparsity import add_masks, l0_penalty
    from hdl.stacked import StackedNet

    nets = []
    for seed in range(3):
        torch.manual_seed(seed)
        net = MLP(input_shape=[5], num_outputs=3, hidden=[8])
        add_masks(net, 0.1)
        nets.append(net)
    stacked = StackedNet(nets)
    x, y = torch.randn(3, 4, 5), torch.randint(0, 3, (3, 4))
    out = stacked(x.reshape(12, 5)).reshape(3, 4, 3)
    for i, net in enumerate(nets):
        torch.testing.assert_close(out[i], net(x[i]))
    loss = HolisticLoss(robust={"eps": 0.1})
    eps = torch.tensor([0.1, 0.2, 0.3]).repeat_interleave(4)
    per, _ = loss.per_example(stacked, x.reshape(12, 5), y.reshape(12), eps=eps)
    per.view(3, 4).mean(1).sum().backward()
    for i, net in enumerate(nets):
        alone = HolisticLoss(robust={"eps": 0.1 * (i + 1)})
        p, _ = alone.per_example(net, x[i], y[i])
        p.mean().backward()
        torch.testing.assert_close(per.view(3, 4)[i], p.detach(), rtol=1e-5, atol=1e-6)
        for name, param in net.named_parameters():
            torch.testing.assert_close(stacked.base.get_parameter(name).grad[i], param.grad)
    l0, _ = stacked.penalties()
    torch.testing.assert_close(l0, torch.stack([l0_penalty(n) for n in nets]).detach())


def test_what_would_couple_members_is_refused():
    from hdl.models.mlp import MLP
    from hdl.stacked import StackedNet

    with pytest.raises(ConfigError, match="batch norm"):
        StackedNet([MLP(input_shape=[4], num_outputs=2, hidden=[4], batch_norm=True)] * 2)
    with pytest.raises(ConfigError, match="dropout"):
        StackedNet([MLP(input_shape=[4], num_outputs=2, hidden=[4], dropout=0.5)] * 2)
    with pytest.raises(ConfigError, match="other parameters"):
        StackedNet(
            [
                MLP(input_shape=[4], num_outputs=2, hidden=[4]),
                MLP(input_shape=[4], num_outputs=2, hidden=[5]),
            ]
        )


def _key(overrides: list[str]):
    from hdl.stacking import stacking_key

    return stacking_key(_job(overrides, Path("/tmp/hdl-key"))[0])


def test_stacking_key_groups_values_and_separates_structure():
    base = ["loss=robust", "data=iris"]
    key, reason = _key(base)
    assert reason is None
    assert _key([*base, "loss.robust.eps=0.3", "data.split_seed=2", "seed=5"])[0] == key
    assert _key([*base, "loss.robust.eps=0"])[0] != key  # the term switched off: structure
    assert _key([*base, "optimizer.lr=0.01"])[0] == key  # Adam: a member's own rate
    cosine = [*base, "scheduler=cosine"]
    assert _key([*cosine, "optimizer.lr=0.01"])[0] != _key(cosine)[0]
    assert _key([*base, "optimizer.weight_decay=0.1"])[0] != key
    assert _key([*base, "model.hidden=[8]"])[0] != key
    assert _key([*base, "model.dropout=0.2"]) == (None, "dropout")
    assert _key(["loss=pgd_at", "data=iris"])[0] is None
    assert _key([*base, "trainer.gradient_clip_val=1.0"]) == (None, "a gradient-norm clip")


def test_plan_tasks_caps_members_and_fills_workers():
    from hdl.stacked_launcher import plan_tasks

    keys = ["a"] * 5 + ["b"] * 3 + [None]
    tasks = plan_tasks(keys, max_members=4, workers=2)
    assert sorted(i for t in tasks for i in t) == list(range(9))
    assert max(len(t) for t in tasks) <= 4
    assert [8] in tasks  # the job without a key runs alone
    assert all(len({keys[i] for i in t}) == 1 for t in tasks)
    assert len(plan_tasks(["a"] * 6, max_members=64, workers=3)) == 3
    # the costly group first, whatever its size: workers taking tasks in order end together
    costs = [1.0] * 5 + [2.0] * 3 + [1.0]
    assert plan_tasks(keys, max_members=8, workers=1, costs=costs)[0] == [5, 6, 7]


def test_stacked_launcher_sweep_writes_every_member_folder(tmp_path):
    """One command, 2 presets x 2 splits: two stacked jobs in two worker processes; every job
    folder holds what a separate run writes, and the sweep summary counts them all."""
    sweep_dir = tmp_path / "sweep"
    env = dict(os.environ, WANDB_MODE="offline")
    cmd = [
        sys.executable,
        "-m",
        "hdl.train",
        "-m",
        "hydra/launcher=stacked",
        "hydra.launcher.n_jobs=2",
        "data=iris",
        *FAST,
        "threads=1",
        "loss=baseline,holistic",
        "data.split_seed=0,1",
        "model.dropout=0.0",
        f"hydra.sweep.dir={sweep_dir}",
        "run_id=stk",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 jobs as 2 tasks" in proc.stderr
    jobs = sorted(p.parent for p in sweep_dir.glob("*/.hydra"))
    assert len(jobs) == 4
    for job in jobs:
        for name in ("metrics.json", "predictions.npz", "weights.npz", "selected.ckpt"):
            assert (job / name).is_file(), (job, name)
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["stacked"]["members"] == 2
        assert (job / "csv" / "metrics.csv").is_file()
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert summary["ok"] == 4
