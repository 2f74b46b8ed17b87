"""Every config file composes and its objects build; bad values fail with one clear line."""

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from hdl.build import config_dir
from tests.conftest import TINY, compose

CONF = Path(config_dir())
GROUPS = {
    p.parent.name: sorted(q.stem for q in p.parent.glob("*.yaml") if not q.stem.startswith("_"))
    for p in CONF.glob("*/*.yaml")
    if p.parent.name not in ("hydra", "hparams_search")
}


def all_choices():
    for group, names in sorted(GROUPS.items()):
        for name in names:
            yield group, name


@pytest.mark.parametrize("group, name", list(all_choices()))
def test_every_config_file_composes(group, name, tmp_path):
    overrides = [f"{group}={name}"]
    if group == "data" and name in ("csv", "sequence_csv"):
        overrides.append("data.path=x.csv")
    if group == "data" and name == "csv_pair":
        overrides += ["data.features_path=x.csv", "data.labels_path=y.csv"]
    cfg = compose(overrides, tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["data"] and resolved["model"] and resolved["loss"]
    assert cfg.trainer.inference_mode is False  # attacks need gradients in test loops


def test_loss_presets_build_the_composite_loss():
    from hdl.losses import HolisticLoss

    for name in GROUPS["loss"]:
        cfg = compose([f"loss={name}"])
        loss = HolisticLoss(**OmegaConf.to_container(cfg.loss, resolve=True))
        assert loss.is_baseline == (name == "baseline")
        assert loss.name == name


@pytest.mark.parametrize("name", ["wine", "iris", "breast_cancer", "digits"])
def test_sklearn_data_presets_instantiate(name):
    cfg = compose([f"data={name}"])
    node = OmegaConf.to_container(cfg.data, resolve=True)
    node.pop("name")
    data = instantiate(node)
    data.prepare_arrays()
    assert data.num_outputs >= 2 and len(data.tensors["train"][0]) > 0


def test_tiny_overrides_compose(tmp_path):
    cfg = compose(TINY + ["loss=holistic"], tmp_path)
    assert cfg.trainer.max_epochs == 3


@pytest.mark.parametrize("group, base", [("loss", "baseline"), ("data", "_splits")])
def test_presets_extend_one_base_instead_of_copying_it(group, base):
    """Loss presets extend baseline (the schema) and data presets the shared split keys, through
    Hydra's defaults list; each composes to the base's keys plus its own."""
    import yaml

    from hdl.build import load_preset

    base_keys = set(yaml.safe_load((CONF / group / f"{base}.yaml").read_text()))
    for name in GROUPS[group]:
        if name == base:
            continue
        text = yaml.safe_load((CONF / group / f"{name}.yaml").read_text())
        assert text.get("defaults"), f"{group}/{name}.yaml does not extend a base"
        assert base_keys <= set(load_preset(group, name)), name
