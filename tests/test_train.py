"""End-to-end: hdl-train for every loss preset, a multirun, bad configs and data, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hdl.errors import HDLError
from hdl.runner import run
from tests.conftest import TINY, assert_robust_at_most_natural, compose

SPARSE_TINY = ["loss.sparse.rewind_fraction=0", "loss.sparse.l0=0.3", "loss.sparse.mask_lr=0.05"]


def run_in_process(overrides, run_dir):
    cfg = compose(TINY + overrides, run_dir)
    return run(cfg, Path(run_dir))


@pytest.mark.parametrize("loss", ["baseline", "robust", "stable", "sparse", "holistic"])
def test_each_loss_preset_trains_and_writes_metrics(loss, tmp_path):
    extra = SPARSE_TINY if loss in ("sparse", "holistic") else []
    metrics = run_in_process([f"loss={loss}", "data=wine", *extra], tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    m = saved["metrics"]
    assert saved["loss"] == loss and saved["config"]["loss"]["name"] == loss
    assert 0.0 <= m["test/acc"] <= 1.0
    assert m["test/pgd_acc@0.5"] <= m["test/pgd_acc@0.1"] + 1e-9 <= m["test/acc"] + 2e-9
    assert_robust_at_most_natural(m)
    assert "sparsity/zero_fraction" in m and m["time/epoch_s"] > 0
    assert "torch" in saved["versions"]
    assert (tmp_path / "predictions.npz").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    if loss == "baseline":
        assert m["sparsity/zero_fraction"] == 0.0
    if loss in ("sparse", "holistic"):
        assert m["sparsity/zero_fraction"] > 0.0
    if loss in ("stable", "holistic"):
        assert "train/theta" in m
    if loss in ("robust", "holistic"):
        assert "train/robust" in m
    assert metrics["metrics"] == m


def hdl_train(*args, cwd, env_extra=None, timeout=300):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env_extra or {})}
    exe = Path(sys.executable).with_name("hdl-train")
    return subprocess.run(
        [str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_cli_run_with_wandb_offline_prints_table(tmp_path):
    run_dir = tmp_path / "run"
    proc = hdl_train(
        "loss=holistic",
        "data=iris",
        "trainer=cpu",
        "trainer.max_epochs=3",
        "eval.steps=3",
        "eval.square_check=false",
        *SPARSE_TINY,
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test/acc" in proc.stdout and str(run_dir) in proc.stdout.replace("\n", "")
    assert (run_dir / "metrics.json").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_multirun_two_jobs_get_their_own_dirs(tmp_path):
    sweep = tmp_path / "sweep"
    proc = hdl_train(
        "-m",
        "loss=baseline,stable",
        "data=iris",
        "trainer=cpu",
        "trainer.max_epochs=2",
        "logger=csv",
        "eval.steps=2",
        "eval.square_check=false",
        "print_metrics=false",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = sorted(sweep.glob("*/metrics.json"))
    assert len(found) == 2
    losses = sorted(json.loads(p.read_text())["loss"] for p in found)
    assert losses == ["baseline", "stable"]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("loss.robust.eps=-0.1", "loss.robust.eps"),
        ("loss.stable.ratio=1.5", "loss.stable.ratio"),
        ("loss.robust.norm=3", "loss.robust.norm"),
        ("+loss.robust.epsilon=0.1", "loss.robust.epsilon"),
        ("eval.eps=[-1]", "eval.eps"),
        ("data.dataset=nope", "data.dataset"),
        ("data=csv", "data.path"),
        ("ckpt_path=/no/such.ckpt", "ckpt_path"),
        ("trainer.max_epochs=0", "trainer.max_epochs"),
        ("threads=0", "threads"),
        ("+model.widht=3", "model"),
    ],
)
def test_bad_config_fails_naming_the_key_before_training(override, needle, tmp_path):
    with pytest.raises(HDLError, match=needle.replace(".", r"\.")) as info:
        run_in_process(["loss=robust", override], tmp_path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "checkpoints").exists()  # nothing trained


@pytest.mark.parametrize(
    "content, needle",
    [
        ("a,b,label\n1,2,0\n3,,1\n", "NaN"),
        ("", "empty"),
        ("a,b,label\n1,2,0.5\n3,4,1.5\n5,6,2.5\n", "non-integer"),
        ("a,b,cls\n1,2,0\n", "label_column"),
    ],
)
def test_bad_data_fails_before_training(content, needle, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(HDLError, match=needle):
        run_in_process(["data=csv", f"data.path={path}"], tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_cli_error_is_one_line_and_nonzero_exit(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b,label\n1,2,0\n3,,1\n")
    proc = hdl_train(
        "data=csv", f"data.path={path}", "logger=none", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "NaN" in lines[0] and str(path) in lines[0], proc.stderr
    proc = hdl_train(
        "loss.robust.eps=-1", "loss=robust", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path
    )
    assert proc.returncode == 2 and "loss.robust.eps" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resume_from_last_checkpoint(tmp_path):
    first = tmp_path / "first"
    run_in_process(["loss=stable", "data=iris", "test=false"], first)
    ckpt = first / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    second = tmp_path / "second"
    metrics = run_in_process(
        ["loss=stable", "data=iris", "trainer.max_epochs=5", f"ckpt_path={ckpt}"], second
    )
    assert metrics["epochs"] == 5
    import torch

    state = torch.load(ckpt, weights_only=False)
    assert state["epoch"] == 2 and "loss.theta" in state["state_dict"]
    # the resumed run continued the step count instead of starting over
    steps_first = state["global_step"]
    assert metrics["global_step"] > steps_first
