"""Scaling out: launchers, one job per GPU, DDP on CPU (gloo), kill-and-resume, sweeps."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from hdl.errors import ConfigError
from hdl.runner import run
from tests.conftest import assert_robust_at_most_natural, compose

REPO = Path(__file__).resolve().parent.parent
QUIET = [
    "logger=csv",
    "print_metrics=false",
    "~callbacks.progress_bar",
    "eval.steps=2",
    "eval.square_check=false",
]
# iris with an even training split (84 rows): two DDP ranks get equal shards, no padding
EVEN_IRIS = ["data=iris", "data.val_size=0.25"]
# pinned, not the preset's defaults: the tests below count on two search rounds + the final one
HOLISTIC = [
    "loss=holistic",
    "loss.sparse.search_rounds=2",
    "loss.sparse.rewind_fraction=0",
    "loss.sparse.l0=0.3",
]


def env(**extra):
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **extra}


def hdl_train(*args, cwd, timeout=300, **extra_env):
    exe = Path(sys.executable).with_name("hdl-train")
    return subprocess.run(
        [str(exe), *args],
        cwd=cwd,
        env=env(**extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


# --- launcher configs --------------------------------------------------------------------------


def test_slurm_launcher_config_makes_a_valid_sbatch_script(tmp_path, monkeypatch):
    """No SLURM here: resolve the preset and let submitit itself write the sbatch script.

    Only submitit's "is srun on PATH" probe is patched; nothing is submitted."""
    import submitit
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))

    cfg = compose(
        [
            "hydra/launcher=slurm",
            "trainer=ddp",
            "trainer.devices=4",
            "trainer.num_nodes=2",
            "hydra.launcher.partition=gpu",
        ],
        tmp_path,
    )
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["_target_"].endswith("SlurmLauncher")
    assert (params["tasks_per_node"], params["gpus_per_node"], params["nodes"]) == (4, 4, 2)
    # the same translation hydra-submitit-launcher does before submitting
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=tmp_path / "sub", slurm_max_num_timeout=params["max_num_timeout"]
    )
    base = {
        "timeout_min",
        "cpus_per_task",
        "gpus_per_node",
        "tasks_per_node",
        "mem_gb",
        "nodes",
        "name",
        "stderr_to_stdout",
    }
    executor.update_parameters(
        **{
            (k if k in base else f"slurm_{k}"): v
            for k, v in params.items()
            if k not in ("_target_", "submitit_folder", "max_num_timeout")
        }
    )
    script = executor._executor._make_submission_file_text("python -u job.py", "uid")
    for line in (
        "--partition=gpu",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--cpus-per-task=8",
        "--signal=USR2@120",
        "--time=240",
        "--open-mode=append",
    ):
        assert f"#SBATCH {line}" in script, (line, script)
    assert executor._executor.max_num_timeout == 5


def test_local_and_joblib_presets_compose(tmp_path):
    local = compose(["hydra/launcher=local"], tmp_path).hydra.launcher
    assert local._target_.endswith("LocalLauncher") and local.gpus_per_node == 0
    joblib = compose(["hydra/launcher=joblib"], tmp_path).hydra.launcher
    assert joblib._target_.endswith("JoblibLauncher") and joblib.n_jobs == 2


# --- one job per GPU ---------------------------------------------------------------------------


def test_gpu_claims_follow_job_number_and_exclude_each_other(tmp_path):
    from hdl.launch import claim_gpu

    first = claim_gpu(job_num=5, n_gpus=4, directory=tmp_path)
    assert first.index == 1  # job 5 of 4 GPUs prefers GPU 1
    second = claim_gpu(job_num=1, n_gpus=4, directory=tmp_path)
    assert second.index == 2  # GPU 1 is taken: the next free one
    others = [claim_gpu(job_num=0, n_gpus=4, directory=tmp_path) for _ in range(2)]
    assert sorted(c.index for c in others) == [0, 3]
    with pytest.raises(TimeoutError):  # all four busy
        claim_gpu(job_num=0, n_gpus=4, directory=tmp_path, timeout_s=0.2, poll_s=0.05)
    second.release()
    assert claim_gpu(job_num=0, n_gpus=4, directory=tmp_path).index == 2
    # a claim held by another process blocks this one, and dies with that process
    code = (
        "import sys, time; from pathlib import Path; from hdl.launch import claim_gpu; "
        f"c = claim_gpu(0, 1, Path({str(tmp_path / 'other')!r})); print(c.index, flush=True); "
        "time.sleep(30)"
    )
    (tmp_path / "other").mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert proc.stdout.readline().strip() == "0"
        with pytest.raises(TimeoutError):
            claim_gpu(0, 1, tmp_path / "other", timeout_s=0.2, poll_s=0.05)
    finally:
        proc.kill()
        proc.wait()
    assert claim_gpu(0, 1, tmp_path / "other").index == 0


def test_gpu_per_job_preset_needs_a_gpu_and_is_not_a_trainer_argument(tmp_path):
    from hdl.build import trainer_settings

    cfg = compose(["trainer=gpu_per_job"], tmp_path)
    assert cfg.trainer.gpu_per_job is True
    if torch.cuda.is_available():
        kwargs, claim = trainer_settings(cfg)
        assert "gpu_per_job" not in kwargs and kwargs["devices"] == [claim.index]
        claim.release()
    else:
        with pytest.raises(ConfigError, match="gpu_per_job"):
            trainer_settings(cfg)


def test_script_ddp_is_refused_inside_a_multirun():
    from hdl.launch import check_ddp_launch

    ddp = {"strategy": "ddp_find_unused_parameters_true", "devices": 2}
    check_ddp_launch(ddp, multirun=False)  # a single run: Lightning starts the ranks
    check_ddp_launch({**ddp, "devices": 1}, multirun=True)
    with pytest.raises(ConfigError, match="hydra/launcher=slurm"):
        check_ddp_launch(ddp, multirun=True)


# --- real sweeps through the launchers ---------------------------------------------------------


@pytest.mark.parametrize(
    "script, extra_env",
    [
        ("local_submitit.sh", {"SEEDS": "0,1"}),
        ("joblib_gpus.sh", {"SEEDS": "0", "TRAINER": "cpu", "N_GPUS": "2"}),
    ],
)
def test_sweep_scripts_run_here(script, extra_env, tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            str(REPO / "sweeps" / script),
            "data=iris",
            "trainer.accelerator=cpu",
            "trainer.max_epochs=3",
            "++loss.sparse.rewind_fraction=0",  # baseline has no such key
            *QUIET,
            "test=false",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env=env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra_env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    found = sorted(sweep.glob("*/metrics.json"))
    assert len(found) == 2, list(sweep.rglob("*"))
    runs = [json.loads(p.read_text()) for p in found]
    assert sorted(r["split_seed"] if "local" in script else r["loss"] for r in runs) == (
        [0, 1] if "local" in script else ["baseline", "holistic"]
    )
    assert all(r["global_step"] > 0 for r in runs)
    if "local" in script:  # submitit's job files: it really went through submitit
        assert list((sweep / ".submitit").rglob("*_result.pkl"))


# --- DDP ---------------------------------------------------------------------------------------


def test_ddp_on_two_cpu_processes_matches_one_process_on_the_global_batch(tmp_path):
    """Holistic loss (robust + theta + masks): 2 gloo ranks x 16 == 1 process x 32."""
    common = [*HOLISTIC, *EVEN_IRIS, *QUIET, "trainer.max_epochs=3"]
    single = tmp_path / "single"
    run(compose(["trainer=cpu", "data.batch_size=32", *common], single), single)

    proc = hdl_train(
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "data.batch_size=16",
        *common,
        "run_id=ddp",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dirs = [p.parent for p in (tmp_path / "outputs").rglob("metrics.json")]
    assert len(run_dirs) == 1, run_dirs  # both ranks in one run dir, one metrics.json
    ddp_dir = run_dirs[0]
    assert ddp_dir.name == "ddp" and len(list((tmp_path / "outputs").rglob("runs/*"))) == 1
    saved = json.loads((ddp_dir / "metrics.json").read_text())
    assert saved["distributed"] == {"world_size": 2, "max_rank_deviation": 0.0}
    ref = json.loads((single / "metrics.json").read_text())
    assert saved["global_step"] == ref["global_step"]
    # the test ran on the whole test set: same size of predictions as the single process
    import numpy as np

    assert (
        np.load(ddp_dir / "predictions.npz")["logits"].shape
        == np.load(single / "predictions.npz")["logits"].shape
    )

    a, b = (
        weights(single / "checkpoints" / "last.ckpt"),
        weights(ddp_dir / "checkpoints" / "last.ckpt"),
    )
    assert a.keys() == b.keys() and "loss.theta" in a
    assert any("logits" in k for k in a)  # the sparsity masks are compared too
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    assert saved["metrics"]["sparsity/zero_fraction"] == pytest.approx(
        ref["metrics"]["sparsity/zero_fraction"]
    )


# --- preemption: kill and resume ---------------------------------------------------------------


def _epoch_of(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"])
    except Exception:  # being written
        return -1


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    epochs = 24  # 3 sparsity rounds of 8 epochs
    # the same thread count in the in-process reference and the subprocesses: another test may
    # have left this process on one thread, and a different reduction order moves a mask logit
    # across the hard threshold within 24 epochs
    threads = torch.get_num_threads()
    overrides = [
        "threads=1",
        *HOLISTIC,
        "loss.sparse.rewind_fraction=0.3",
        "data=iris",
        "model.dropout=0.2",
        f"trainer.max_epochs={epochs}",
        "print_metrics=false",
        "~callbacks.progress_bar",
        "eval.steps=2",
        "test=false",
    ]
    ref_dir = tmp_path / "reference"
    try:
        reference = run(compose(["trainer=cpu", "logger=csv", *overrides], ref_dir), ref_dir)
    finally:
        torch.set_num_threads(threads)

    args = ["trainer=cpu", *overrides, "run_id=preempted"]  # default logger: W&B offline + CSV
    exe = Path(sys.executable).with_name("hdl-train")
    run_dir = tmp_path / "outputs" / "iris_mlp" / "runs" / "preempted"
    last = run_dir / "checkpoints" / "last.ckpt"
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([str(exe), *args], cwd=tmp_path, env=env(), stdout=log, stderr=log)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if last.is_file() and _epoch_of(last) >= 9:  # inside the second sparsity round
            break
        time.sleep(0.05)
    assert proc.poll() is None, "ended before the kill: " + (tmp_path / "killed.log").read_text()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    log.close()
    assert proc.returncode == 143, (tmp_path / "killed.log").read_text()[-3000:]
    assert not (run_dir / "metrics.json").exists()
    killed = torch.load(last, map_location="cpu", weights_only=False)
    assert 9 <= killed["epoch"] < epochs - 1
    assert killed["callbacks"]["SparsityCallback"]["current_round"] >= 1

    resumed = hdl_train(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["resumed_from"] == str(last)
    assert saved["global_step"] == reference["global_step"]
    assert saved["epochs"] == reference["epochs"] == epochs
    # same final weights as the uninterrupted run: optimizer, theta, sparsity round and
    # temperature, rewind snapshot, data order and dropout RNG all came back
    a, b = weights(ref_dir / "checkpoints" / "last.ckpt"), weights(last)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    # one W&B run, resumed: both processes logged under the same run id
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2
    assert len({p.name.rsplit("-", 1)[-1] for p in wandb_runs}) == 1


# --- hyper-parameter search --------------------------------------------------------------------


def test_optuna_search_maximises_the_holistic_objective(tmp_path):
    sweep = tmp_path / "optuna"
    proc = hdl_train(
        "+hparams_search=holistic_optuna",
        "data=iris",
        "trainer=cpu",
        "trainer.max_epochs=3",
        "loss.sparse.rewind_fraction=0",
        *QUIET,
        "test=false",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = [json.loads(p.read_text()) for p in sorted(sweep.glob("trial_*/metrics.json"))]
    assert len(trials) == 2
    for t in trials:
        m, w = t["metrics"], t["config"]["objective"]["weights"]
        expected = (
            w["acc"] * m["val/acc"]
            + w["adv"] * m["val/pgd_acc@0.1"]
            + w["sparsity"] * m["sparsity/zero_fraction"]
        )
        assert m["objective/holistic"] == pytest.approx(expected)
        assert 0.0 <= m["val/pgd_acc@0.1"] <= 1.0
        assert_robust_at_most_natural(m)
    best = max(trials, key=lambda t: t["metrics"]["objective/holistic"])
    assert result["best_value"] == pytest.approx(best["metrics"]["objective/holistic"])
    assert set(result["best_params"]) == {
        "loss.robust.eps",
        "loss.stable.ratio",
        "loss.sparse.l0",
        "loss.l2",
    }


def _sample_values(spec: dict) -> list:
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    return [spec["min"], spec["max"]]


@pytest.mark.parametrize(
    "path", sorted((REPO / "sweeps").glob("wandb_*.yaml")), ids=lambda p: p.name
)
def test_wandb_sweep_parameters_are_valid_hydra_overrides(path, tmp_path):
    from hdl.config import validate

    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "hdl-train" and "${args_no_hyphens}" in sweep["command"]
    params = sweep["parameters"]
    fixed = [f"{k}={_sample_values(v)[0]}" for k, v in params.items()]
    for key, spec in params.items():  # every value of every parameter, the others fixed
        for value in _sample_values(spec):
            overrides = [o for o in fixed if not o.startswith(f"{key}=")] + [f"{key}={value}"]
            cfg = compose(overrides, tmp_path)
            validate(cfg)
            if not key.startswith("+") and "." in key:
                assert OmegaConf.select(cfg, key) == pytest.approx(value) or str(
                    OmegaConf.select(cfg, key)
                ) == str(value), (key, value)
    cfg = compose(fixed, tmp_path)
    metric = sweep["metric"]["name"]
    # sweeps rank on validation only: the test split never chooses anything
    assert not metric.startswith("test/"), metric
    if metric.startswith("objective/"):
        assert cfg.optimized_metric == metric and cfg.objective.weights
    else:  # the validation robust accuracy that the objective writes, at its radius
        from hdl.keys import metric_key

        assert cfg.objective, "a val/ adversarial metric needs +hparams_search=objective"
        assert metric == metric_key("val", cfg.eval.attack, "acc", cfg.objective.eps)


def test_searches_rank_on_validation_only():
    """Every sweep and search config optimises a validation quantity, never a test metric."""
    files = sorted((REPO / "sweeps").glob("*.yaml")) + sorted(
        (REPO / "conf" / "hparams_search").glob("*.yaml")
    )
    assert files
    for path in files:
        text = yaml.safe_load(path.read_text()) or {}
        names = [text.get("optimized_metric"), (text.get("metric") or {}).get("name")]
        for name in filter(None, names):
            assert not str(name).startswith("test/"), f"{path.name} ranks on {name}"
