import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def compose(overrides: list[str], run_dir=None):
    """Compose conf/train.yaml as hdl-train would, with HydraConfig set so ${hydra:...} resolves."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from hdl.build import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


TINY = [
    "trainer=cpu",
    "trainer.max_epochs=3",
    "logger=csv",
    "eval.eps=[0.1,0.5]",
    "eval.steps=5",
    "eval.square_check=false",
    "print_metrics=false",
    "~callbacks.progress_bar",
]


def assert_robust_at_most_natural(metrics: dict) -> None:
    """The hard invariant of robust accuracy: a point counts only when it is correct on the
    clean input and under attack, so no attack's accuracy exceeds the natural one."""
    from hdl.keys import natural_key, parse_metric_key

    for key, value in metrics.items():
        parsed = parse_metric_key(key)
        if parsed and parsed.kind == "acc":
            natural = metrics[natural_key(parsed.split, "acc")]
            assert value <= natural + 1e-6, f"{key}={value} > natural {natural}"
