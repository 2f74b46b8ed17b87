"""Nothing silent, nothing lost: run identity and resumes, failures, sweeps, one-line errors,
folder names, quiet output, comparison tables and plots, and the template conveniences
(docs/runs.md). Every training here is tiny (iris, 2 epochs, one thread)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from hdl.errors import ConfigError, HDLError
from tests.conftest import TINY, compose

REPO = Path(__file__).resolve().parent.parent
FAST = [
    "trainer=cpu",
    "trainer.max_epochs=2",
    "data=iris",
    "eval.eps=[0.1]",
    "eval.steps=3",
    "eval.square_check=false",
    "logger=csv",
    "threads=1",
    "print_metrics=false",
    "~callbacks.progress_bar",
]


def cli(tool: str, *args: str, cwd: Path, silent: bool = True, timeout: int = 300):
    """Run a command line tool; ``silent=False`` leaves W&B's verbosity to hdl-train."""
    env = {k: v for k, v in os.environ.items() if silent or not k.startswith("WANDB_SILENT")}
    env |= {"WANDB_MODE": "offline"} | ({"WANDB_SILENT": "true"} if silent else {})
    exe = Path(sys.executable).with_name(tool)
    return subprocess.run(
        [str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    return lines[0]


SMALL = [*TINY, "threads=1", "data=iris", "trainer.max_epochs=2", "eval.eps=[0.1]", "eval.steps=3"]


def run_tiny(overrides: list[str], run_dir: Path) -> dict:
    from hdl.runner import run

    return run(compose([*SMALL, *overrides], run_dir), Path(run_dir))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny finished run (iris, 2 epochs), shared by the checkpoint and hdl-eval tests."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run_tiny([], run_dir)
    return run_dir


def write_csv(path: Path, rows: int = 90, nan: bool = False) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 3))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5)
    lines = ["a,b,c,label"] + [
        f"{r[0]:.3f},{r[1]:.3f},{r[2]:.3f},{t}" for r, t in zip(x, y, strict=True)
    ]
    if nan:
        lines[2] = "1.0,,2.0,0"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# --- 1. run identity, logs that survive a resume, quiet output ---------------------------------


def test_run_id_resumes_only_its_own_configuration_and_keeps_the_csv_history(tmp_path):
    """Reusing a run_id with other overrides is refused (before Hydra rewrites the folder);
    relaunching with more epochs resumes, and csv/metrics.csv keeps every epoch. The default
    logger (W&B offline + CSV) runs quietly."""
    base = [a for a in FAST if a != "logger=csv"] + ["run_id=exp"]
    first = cli("hdl-train", *base, cwd=tmp_path, silent=False)
    assert first.returncode == 0, first.stderr[-3000:]
    output = first.stdout + first.stderr
    for noise in ("wandb:", "GPU available", "LitLogger", "LeafSpec", "FutureWarning"):
        assert noise not in output, (noise, output[-3000:])
    run_dir = tmp_path / "outputs" / "iris_mlp" / "runs" / "exp"
    identity = json.loads((run_dir / "identity.json").read_text())
    assert identity["config"]["optimizer.lr"] == 0.001 and len(identity["hash"]) == 16
    assert "run_id" not in identity["config"] and "threads" not in identity["config"]
    hydra_config = (run_dir / ".hydra" / "config.yaml").read_text()

    other = cli("hdl-train", *base, "optimizer.lr=0.01", cwd=tmp_path)
    assert other.returncode == 2
    line = one_line(other.stderr)
    assert "optimizer.lr: 0.001 -> 0.01" in line and "new run_id" in line
    assert (run_dir / ".hydra" / "config.yaml").read_text() == hydra_config  # not relabelled
    assert "relaunch refused" in (run_dir / "train.log").read_text()

    longer = cli("hdl-train", *base, "trainer.max_epochs=4", cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr[-3000:]
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["resumed_from"] and saved["epochs"] == 4
    with (run_dir / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    epochs = sorted({int(float(r["epoch"])) for r in rows if r.get("train/loss")})
    assert epochs == [0, 1, 2, 3], epochs
    val_epochs = sorted({int(float(r["epoch"])) for r in rows if r.get("val/loss")})
    assert val_epochs == [0, 1, 2, 3]


def test_identity_ignores_bookkeeping_keys_only():
    from hdl.identity import differences, identity_config

    a = identity_config(compose(["run_id=a", "threads=1", "logger=csv", "trainer.max_epochs=2"]))
    b = identity_config(compose(["run_id=b", "threads=2", "trainer.max_epochs=9", "tags=[x]"]))
    assert differences(a, b) == []
    c = identity_config(compose(["loss=robust"]))
    assert any(d.startswith("loss.robust.eps: 0.0 -> 0.1") for d in differences(a, c))


# --- 2. non-finite loss ------------------------------------------------------------------------


def test_non_finite_loss_stops_the_run_with_exit_code_3(tmp_path):
    run_dir = tmp_path / "run"
    proc = cli("hdl-train", *FAST, "optimizer.lr=1e30", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]
    line = one_line(proc.stderr)
    assert line.startswith("error: non-finite") and "nan" in line
    assert not (run_dir / "metrics.json").exists()  # nothing that looks like a result
    assert not (run_dir / "selected.ckpt").exists()
    error = (run_dir / "error.txt").read_text()
    assert error.startswith("non-finite") and '"exit_code": 3' in error
    assert "non-finite" in (run_dir / "train.log").read_text()


def test_non_finite_test_metric_is_an_error():
    from hdl.errors import NonFiniteError
    from hdl.runner import check_finite_metrics

    check_finite_metrics({"test/acc": 0.5, "train/theta": math.nan})
    with pytest.raises(NonFiniteError, match="test/mse"):
        check_finite_metrics({"test/mse": math.inf})


# --- 3. keys nothing reads ---------------------------------------------------------------------


def test_plus_key_nothing_reads_is_an_error(tmp_path):
    proc = cli("hdl-train", *FAST, "+lr=0.1", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert "lr is not a known key" in line and "optimizer.lr" in line
    assert "lr is not a known key" in (tmp_path / "r" / "error.txt").read_text()


@pytest.mark.parametrize("override", ["+trainer.foo=1", "+data.foo=1", "+model.foo=1"])
def test_nested_unknown_keys_are_refused_before_any_data_is_loaded(override):
    from hdl.config import validate

    group = override[1:].split(".")[0]
    with pytest.raises(ConfigError, match=rf"^{group}\.foo is not an argument") as info:
        validate(compose([override]))
    assert "\n" not in str(info.value)


# --- 4. hdl-compare never ranks a flagged, smoke or non-finite variant; hdl-eval keeps all -----


def fake_run(
    root: Path,
    name: str,
    loss: str,
    split: int,
    acc: float,
    pgd: float,
    *,
    flags=(),
    square=None,
    fast_dev_run=False,
    steps=200,
    zero=0.0,
    extra=None,
) -> Path:
    run_dir = root / f"{name}_{split}"
    run_dir.mkdir(parents=True)
    metrics = {"test/acc": acc, "test/pgd_acc@0.1": pgd, "sparsity/zero_fraction": zero}
    if square is not None:
        metrics["test/square_acc@0.1"] = square
    config = {
        "loss": {"name": loss, "robust": {"eps": 0.1 if loss != "baseline" else 0.0}},
        "data": {"name": "iris", "split_seed": split},
        "seed": 0,
        "trainer": {"fast_dev_run": fast_dev_run, "max_epochs": 2},
        "model": {"hidden": [8], "tag": name},
        "eval": {"square_queries": 1000},
    }
    meta = {
        "task": "classification",
        "metrics": metrics | (extra or {}),
        "config": config,
        "flags": list(flags),
        "global_step": steps,
        "sparsity": {"net.layers.0": zero, "total": zero},
    }
    text = json.dumps(meta)  # NaN written as NaN, as json.dumps does by default
    (run_dir / "metrics.json").write_text(text)
    rng = np.random.default_rng(split)
    targets = np.arange(40) % 3
    logits = np.eye(3)[targets] * 2 + rng.normal(size=(40, 3))
    np.savez(run_dir / "predictions.npz", logits=logits.astype(np.float32), targets=targets)
    return run_dir


@pytest.fixture()
def mixed_sweep(tmp_path) -> Path:
    """A sound variant, and four that look better but must not be ranked."""
    root = tmp_path / "sweep"
    for split in (0, 1):
        fake_run(root, "sound", "baseline", split, 0.90, 0.50)
        fake_run(root, "masked", "robust", split, 0.95, 0.90, square=0.10)  # Square beats PGD
        fake_run(
            root,
            "collapsed",
            "stable",
            split,
            0.96,
            0.92,
            flags=["collapse (test): 99.0% of the predictions are class 0"],
        )
        fake_run(root, "smoke", "sparse", split, 0.97, 0.95, fast_dev_run=True, steps=1)
        fake_run(
            root, "broken", "holistic", split, 0.99, 0.99, extra={"val/loss": math.nan}, zero=0.9
        )
    return root


def test_compare_never_recommends_a_flagged_smoke_or_non_finite_variant(mixed_sweep, tmp_path):
    from hdl.compare import run_compare

    out = tmp_path / "cmp"
    summary = run_compare([mixed_sweep], out, plots=False)
    labels = list(summary["variants"])
    sound = next(label for label in labels if "sound" in label)
    assert summary["pareto_front"] == [sound]
    assert summary["recommended"][0][0] == sound
    excluded = summary["excluded"]
    assert sorted(excluded) == sorted(label for label in labels if label != sound)
    reasons = {label.split()[0]: " ".join(r) for label, r in excluded.items()}
    assert "gradient masking" in reasons["robust"]
    assert "collapse" in reasons["stable"]
    assert "smoke runs only" in reasons["sparse"] and "fast_dev_run" in reasons["sparse"]
    assert "non-finite metrics" in reasons["holistic"] and "val/loss" in reasons["holistic"]
    md = (out / "comparison.md").read_text()
    assert (
        f"Pareto front (accuracy, robustness, sparsity, stability; ranked variants only): {sound}"
        in md
    )
    assert "Not ranked" in md and "## Warnings" in md and "gradient masking" in md
    # strict JSON: no NaN anywhere (null instead)
    json.loads((out / "comparison.json").read_text(), parse_constant=lambda c: 1 / 0)


def test_smoke_rule_counts_steps_and_debug_trainer_flags(tmp_path):
    from hdl.compare import SMOKE_STEPS, load_run

    assert (
        load_run(fake_run(tmp_path, "a", "baseline", 0, 0.9, 0.5, steps=SMOKE_STEPS)).smoke is None
    )
    assert (
        "optimizer steps"
        in load_run(fake_run(tmp_path, "b", "baseline", 0, 0.9, 0.5, steps=3)).smoke
    )


def test_hdl_eval_merges_eval_json_and_records_the_subset(trained):
    from hdl.evaluate import evaluate_run

    evaluate_run(trained, attacks=["pgd", "fgsm"], eps=[0.1], steps=2)
    evaluate_run(trained, attacks=["fgsm"], eps=[0.1], steps=2, max_examples=10)
    saved = json.loads((trained / "eval.json").read_text())
    assert {"pgd_linf", "fgsm_linf"} <= set(saved["robustness"])  # the earlier attack is kept
    total = saved["total_test_examples"]
    assert saved["robustness"]["pgd_linf"]["0.1"]["subset"] == f"all {total}"
    assert saved["robustness"]["fgsm_linf"]["0.1"]["subset"] == f"first 10 of {total}"
    assert saved["robustness"]["fgsm_linf"]["0.1"]["test_examples"] == 10
    assert [c["subset"] for c in saved["calls"]] == [f"all {total}", f"first 10 of {total}"]


@pytest.mark.parametrize("value", ["0", "-3"])
def test_hdl_eval_max_examples_must_be_positive(value, tmp_path):
    proc = cli("hdl-eval", str(tmp_path), "--max-examples", value, cwd=tmp_path)
    assert proc.returncode == 2
    assert "--max-examples must be a positive integer" in one_line(proc.stderr)


# --- 5. sweeps ---------------------------------------------------------------------------------


def test_sweep_runs_every_job_records_the_failure_and_names_it(tmp_path):
    good, bad = write_csv(tmp_path / "good.csv"), write_csv(tmp_path / "bad.csv", nan=True)
    sweep = tmp_path / "sweep"
    proc = cli(
        "hdl-train",
        "-m",
        *[a for a in FAST if a != "data=iris"],
        "data=csv",
        f"data.path={good},{bad},{good}",
        "data.split_seed=0",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 4, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1", "2"]
    assert (jobs[0] / "metrics.json").is_file() and (jobs[2] / "metrics.json").is_file()
    assert not (jobs[1] / "metrics.json").exists()
    assert "NaN" in (jobs[1] / "error.txt").read_text()
    assert "sweep: 3 jobs, 2 ok, 1 failed" in proc.stderr
    assert f"failed: job #1 data.path={bad}" in proc.stderr
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert [r["status"] for r in summary["results"]] == ["ok", "failed", "ok"]


def test_sweep_validates_every_job_before_the_first_starts(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(
        "hdl-train",
        "-m",
        *FAST,
        "loss=robust",
        "loss.robust.eps=0.1,-1",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "job #1" in proc.stderr and "loss.robust.eps must be >= 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(sweep.rglob("metrics.json")) and not list(sweep.rglob("checkpoints"))


def test_sweep_on_failure_stop_stops_at_the_first_failure(tmp_path):
    good, bad = write_csv(tmp_path / "good.csv"), write_csv(tmp_path / "bad.csv", nan=True)
    sweep = tmp_path / "sweep"
    proc = cli(
        "hdl-train",
        "-m",
        *[a for a in FAST if a != "data=iris"],
        "data=csv",
        f"data.path={bad},{good}",
        "on_failure=stop",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert not list(sweep.rglob("metrics.json"))  # the second job never ran
    assert len(list(sweep.rglob("error.txt"))) == 1


# --- 6. one-line errors, fast --------------------------------------------------------------------

LIGHT_ERRORS = [
    ("loss.robust.eps=abc", "loss.robust.eps must be a number"),
    ("threads=-2", "threads must be a positive integer"),
    ("threads=two", "threads must be a positive integer"),
    ("optimizer.lr=-1", "optimizer.lr must be a finite number > 0"),
]


@pytest.mark.parametrize("override, needle", LIGHT_ERRORS)
def test_light_errors_are_one_line_exit_2_and_logged(override, needle, tmp_path):
    run_dir = tmp_path / "r"
    proc = cli("hdl-train", *FAST, override, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2
    assert needle in one_line(proc.stderr)
    assert needle in (run_dir / "train.log").read_text()
    assert needle in (run_dir / "error.txt").read_text()


def test_light_errors_are_found_without_torch_or_lightning():
    code = (
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "from hydra.core.hydra_config import HydraConfig\n"
        "from omegaconf import open_dict\n"
        "from hdl.config import check_light, config_dir\n"
        "from hdl.errors import ConfigError\n"
        "with initialize_config_dir(config_dir=config_dir(), version_base='1.3'):\n"
        f"    for override, needle in {LIGHT_ERRORS + [('+lr=0.1', 'lr is not a known key')]!r}:\n"
        "        cfg = compose('train', overrides=[override], return_hydra_config=True)\n"
        "        with open_dict(cfg):\n"
        "            cfg.hydra.runtime.output_dir = '/tmp/unused'\n"
        "        HydraConfig.instance().set_config(cfg)\n"
        "        try:\n"
        "            check_light(cfg)\n"
        "        except ConfigError as err:\n"
        "            assert needle in str(err), (override, err)\n"
        "        else:\n"
        "            raise AssertionError(override)\n"
        "heavy = [m for m in ('torch', 'pytorch_lightning', 'wandb') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_corrupt_or_mismatched_ckpt_path_is_one_line(trained, tmp_path):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(HDLError, match="not a readable checkpoint") as info:
        run_tiny([f"ckpt_path={corrupt}"], tmp_path / "a")
    assert "\n" not in str(info.value)
    last = trained / "checkpoints" / "last.ckpt"
    with pytest.raises(HDLError, match=r"does not fit this configuration \(.*shape") as info:
        run_tiny(["model.hidden=[8]", f"ckpt_path={last}"], tmp_path / "b")
    assert "\n" not in str(info.value)
    with pytest.raises(HDLError, match="another configuration.*optimizer.lr"):
        run_tiny(["optimizer.lr=0.5", f"ckpt_path={last}"], tmp_path / "c")
    assert "not a readable checkpoint" in (tmp_path / "a" / "error.txt").read_text()


@pytest.mark.parametrize("name", ["checkpoints/last.ckpt", "selected.ckpt"])
def test_hdl_eval_of_a_corrupt_checkpoint_is_one_line(name, trained, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    if name != "selected.ckpt":  # hdl-eval reads selected.ckpt first, else last.ckpt
        (run_dir / "selected.ckpt").unlink()
    (run_dir / name).write_bytes(b"\x00garbage")
    proc = cli("hdl-eval", str(run_dir), "--attacks", "pgd", "--steps", "2", cwd=tmp_path)
    assert proc.returncode == 2
    assert "not a readable checkpoint" in one_line(proc.stderr)


def test_sweep_with_twenty_overrides_gets_a_short_job_folder(tmp_path):
    sweep = tmp_path / "sweep"
    many = [
        "optimizer.weight_decay=0.0",
        "model.dropout=0.0",
        "model.activation=relu",
        "model.batch_norm=false",
        "data.batch_size=16",
        "data.test_size=0.25",
        "data.val_size=0.2",
        "data.seed=0",
        "data.split_seed=0",
        "data.standardize=true",
        "loss.robust.eps=0.0",
        "loss.l2=0.0",
        "eval.norm=inf",
        "eval.attack=pgd",
        "select.monitor=val/loss",
        "select.mode=min",
        "budget.val_checks=25",
        "trainer.log_every_n_steps=5",
        "trainer.fast_dev_run=true",
    ]
    proc = cli("hdl-train", "-m", *FAST, *many, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (job,) = [p for p in sweep.iterdir() if p.is_dir()]
    assert len(job.name) <= 150 and job.name.startswith("0_budget.val_checks=25")
    assert (job / "metrics.json").is_file()


# --- 7. folder names -------------------------------------------------------------------------


def test_job_folder_names_are_short_safe_and_stable(tmp_path):
    from hdl.naming import MAX_JOB_DIR, job_dirname

    # what conf/train.yaml's hydra.sweep.subdir makes of a path with spaces
    cfg = compose(["data=csv", "data.path='/tmp/my dir/x y.csv'"], tmp_path)
    assert cfg.hydra.sweep.subdir == "0_data.path=x_y.csv,data=csv"

    assert job_dirname(0, "loss=baseline,data.split_seed=0") == "0_loss=baseline,data.split_seed=0"
    name = job_dirname(3, "data.path='/tmp/my dir/train set.csv',eval.eps=[0.1,0.2]")
    assert name == "3_data.path=train_set.csv,eval.eps=[0.1,0.2]"
    long = ",".join(f"group.key{i}=value{i}" for i in range(40))
    capped = job_dirname(7, long)
    assert len(capped) <= MAX_JOB_DIR and capped == job_dirname(7, long)  # stable
    assert capped != job_dirname(7, long + ",x=1")  # the hash tells them apart
    for bad in ("/", " ", "'", '"'):
        assert bad not in name + capped


def test_csv_experiments_are_named_after_the_file(tmp_path):
    cfg = compose(["data=csv", "data.path=/data/my study/heart disease.csv", "run_id=x"])
    assert cfg.name == "heart_disease_mlp"
    assert cfg.hydra.run.dir == "outputs/heart_disease_mlp/runs/x"
    pair = compose(
        ["data=csv_pair", "data.features_path=/d/wdbc_X.csv", "data.labels_path=/d/y.csv"]
    )
    assert pair.name == "wdbc_X_mlp"
    seq = compose(["data=sequence_csv", "data.path=/d/ecg.csv", "model=rnn"])
    assert seq.name == "ecg_rnn"


# --- 8/10. quiet, debug presets, config tree, tags, eval-only, early stopping ------------------


def test_debug_fdr_prints_the_config_tree_and_verbose_lets_lightning_talk(tmp_path):
    proc = cli(
        "hdl-train", *FAST, "debug=fdr", "verbose=true", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "config" in out and "fast_dev_run: true" in out  # the rich tree of print_config
    assert "GPU available" in out  # verbose: Lightning's info lines are back


@pytest.mark.parametrize(
    "preset, key, value",
    [
        ("fdr", "fast_dev_run", True),
        ("overfit", "overfit_batches", 3),
        ("limit", "limit_train_batches", 3),
        ("profiler", "profiler", "simple"),
    ],
)
def test_debug_presets(preset, key, value):
    cfg = compose([f"debug={preset}"])
    assert cfg.trainer[key] == value


def test_tags_reach_wandb_and_are_not_identity():
    cfg = compose(["tags=[baseline,v2]"])
    assert list(cfg.logger.wandb.tags) == ["baseline", "v2"]
    from omegaconf import OmegaConf

    from hdl.config import check_run_keys

    with pytest.raises(ConfigError, match="tags must be a list"):
        check_run_keys(OmegaConf.create({"tags": {"a": 1}}))


def test_eval_only_tests_a_checkpoint_without_training(trained, tmp_path):
    original = json.loads((trained / "metrics.json").read_text())
    metrics = run_tiny(
        ["train=false", f"ckpt_path={trained / 'selected.ckpt'}"],
        tmp_path / "eval",
    )
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["eval_only"] is True and saved["checkpoint"].endswith("selected.ckpt")
    assert saved["metrics"]["test/acc"] == pytest.approx(original["metrics"]["test/acc"])
    assert metrics["selected"]["evaluated"] == "checkpoint"
    assert not (tmp_path / "eval" / "checkpoints").exists()  # nothing trained
    with pytest.raises(ConfigError, match="train=false evaluates a checkpoint"):
        run_tiny(["train=false"], tmp_path / "nothing")


def test_early_stopping_preset_sets_the_selection_patience():
    from hdl.build import build_callbacks
    from hdl.callbacks import SelectBest
    from hdl.losses import HolisticLoss

    cfg = compose(["callbacks=early_stopping", "callbacks.early_stopping.patience=3"], "/tmp/x")
    assert "last_checkpoint" in cfg.callbacks  # the default callbacks are kept
    callbacks = build_callbacks(cfg, HolisticLoss())
    stopper = next(cb for cb in callbacks if type(cb).__name__ == "EarlyStopping")
    select = next(cb for cb in callbacks if isinstance(cb, SelectBest))
    stopper.setup(SimpleNamespace(callbacks=callbacks), None, "fit")
    assert select.patience == 3


# --- 9. plots that hold up -----------------------------------------------------------------------


def _capture(monkeypatch) -> list:
    import hdl.plots

    figures = []
    monkeypatch.setattr(hdl.plots, "_save", lambda fig, path: figures.append(fig) or path)
    return figures


def _variant(label: str, zero: float = 0.0, acc: float = 0.9):
    stats = {"test/acc": (acc, 0.01), "test/pgd_acc@0.1": (acc - 0.2, 0.01)}
    runs = [SimpleNamespace(metrics={"test/acc": acc})]
    return SimpleNamespace(
        label=label, task="classification", stats=stats, runs=runs, layers={"fc1": zero}
    )


def test_radar_leaves_a_missing_axis_out_instead_of_drawing_zero(monkeypatch, tmp_path):
    from hdl.plots import radar

    figures = _capture(monkeypatch)
    axes = ("accuracy", "robustness", "sparsity", "stability")
    points = {
        "a": {"accuracy": 0.9, "robustness": 0.5, "sparsity": 0.2, "stability": math.nan},
        "b": {"accuracy": 0.8, "robustness": 0.6, "sparsity": 0.1, "stability": 0.9},
    }
    radar(points, points, axes, tmp_path / "r.png")
    line = figures[0].axes[0].lines[0]
    radii = list(line.get_ydata())
    assert math.isnan(radii[3]) and 0.0 not in radii


def test_sparsity_plot_says_so_when_nothing_is_zero(monkeypatch, tmp_path):
    from hdl.plots import sparsity_per_layer

    figures = _capture(monkeypatch)
    sparsity_per_layer([_variant("baseline"), _variant("robust")], tmp_path / "s.png")
    texts = [t.get_text() for t in figures[0].axes[0].texts]
    assert any("no zero weights" in t for t in texts)


def test_long_variant_names_are_numbered_with_a_key_outside_the_axes(monkeypatch, tmp_path):
    from hdl.plots import accuracy_vs_eps

    figures = _capture(monkeypatch)
    long = "holistic loss.robust.eps=0.2 loss.sparse.l0=0.03 model.hidden=[128,128]"
    accuracy_vs_eps([_variant(long), _variant("baseline")], tmp_path / "a.png")
    fig = figures[0]
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["[1]", "[2]"]
    assert legend.get_bbox_to_anchor().x0 > fig.axes[0].get_window_extent().x1 - 1
    assert any(long in t.get_text() for t in fig.texts)  # the key


# --- the checks accept every shipped preset ------------------------------------------------------


def _presets():
    conf = REPO / "conf"
    for path in sorted(conf.glob("*/*.yaml")):
        group, name = path.parent.name, path.stem
        if group not in ("hydra", "hparams_search") and not name.startswith("_"):
            yield group, name


@pytest.mark.parametrize("group, name", list(_presets()))
def test_every_preset_passes_the_checks(group, name, tmp_path):
    from hdl.config import validate

    overrides = [f"{group}={name}"]
    if group == "data" and name in ("csv", "sequence_csv"):
        overrides.append(f"data.path={write_csv(tmp_path / 'x.csv')}")
    if group == "data" and name == "csv_pair":
        path = write_csv(tmp_path / "x.csv")
        overrides += [f"data.features_path={path}", f"data.labels_path={path}"]
    validate(compose(overrides, tmp_path))
