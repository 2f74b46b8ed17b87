"""Image and sequence data modules on small sizes: shapes, ranges, splits, labels, bad files."""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from hdl.build import load_preset
from hdl.data.base import limit_examples
from hdl.data.images import DigitsImages, MnistSubset, TorchvisionImages
from hdl.data.sequences import DigitsRows, MnistRows, NoisySine, SequenceCSV
from hdl.errors import ConfigError, DataError


def split_ids(dm) -> dict[str, set[int]]:
    return {k: set(v.tolist()) for k, v in dm.split_indices.items()}


def check_splits(make) -> None:
    """Disjoint splits covering everything; test fixed across split_seed; train/val redrawn."""
    a, b = make(split_seed=0), make(split_seed=1)
    a.setup(), b.setup()
    ia, ib = split_ids(a), split_ids(b)
    assert not (ia["train"] & ia["val"]) and not (ia["train"] & ia["test"])
    assert not (ia["val"] & ia["test"])
    n = sum(len(v) for v in ia.values())
    assert ia["train"] | ia["val"] | ia["test"] == set(range(n))
    assert ia["test"] == ib["test"]
    assert ia["train"] != ib["train"]
    torch.testing.assert_close(a.tensors["test"][1], b.tensors["test"][1])
    if not a.standardize:  # standardised features follow the training split's statistics
        torch.testing.assert_close(a.tensors["test"][0], b.tensors["test"][0])


# --- images ------------------------------------------------------------------------------------
def test_digits_images():
    dm = DigitsImages(batch_size=32)
    dm.setup()
    x, y = dm.tensors["train"]
    assert dm.input_shape == (1, 8, 8) and x.dtype == torch.float32
    assert dm.num_outputs == 10 and dm.task == "classification" and y.dtype == torch.int64
    assert dm.input_range == (0.0, 1.0)
    all_x = torch.cat([t[0] for t in dm.tensors.values()])
    assert all_x.min() == 0.0 and all_x.max() == 1.0
    assert sum(len(t[1]) for t in dm.tensors.values()) == 1797
    # pixels are 0..16 in sixteenths
    torch.testing.assert_close(all_x * 16, (all_x * 16).round())
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (32, 1, 8, 8) and yb.shape == (32,)
    check_splits(lambda **kw: DigitsImages(limit=300, **kw))


def test_images_standardized_on_request_are_unbounded():
    dm = DigitsImages(standardize=True)
    dm.setup()
    assert dm.input_range is None
    assert dm.tensors["train"][0].max() > 1.0


def test_limit_is_stratified_and_fixed_by_seed():
    dm = DigitsImages(limit=200, seed=3)
    dm.setup()
    y = torch.cat([t[1] for t in dm.tensors.values()])
    assert len(y) == 200 and set(y.tolist()) == set(range(10))
    assert torch.bincount(y).min() >= 18
    again = DigitsImages(limit=200, seed=3)
    again.setup()
    torch.testing.assert_close(again.tensors["test"][0], dm.tensors["test"][0])
    x, yy = limit_examples(np.arange(10), np.arange(10) % 2, None, 0)
    assert len(x) == 10
    with pytest.raises(ConfigError, match="data.limit"):
        DigitsImages(limit=0)


def test_mnist_subset():
    dm = MnistSubset(limit=300)
    dm.setup()
    x, y = dm.tensors["train"]
    assert dm.input_shape == (1, 28, 28) and dm.input_range == (0.0, 1.0)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.9
    assert dm.num_outputs == 10 and sum(len(t[1]) for t in dm.tensors.values()) == 300


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX (MNIST) file of uint8 values."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("dataset, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_images_from_a_local_root(tmp_path, dataset, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 4)
    dm = TorchvisionImages(dataset=dataset, root=str(tmp_path), test_size=0.25)
    dm.setup()
    assert dm.input_shape == (1, 28, 28) and dm.num_outputs == 4
    assert dm.input_range == (0.0, 1.0)
    all_x = torch.cat([t[0] for t in dm.tensors.values()])
    assert len(all_x) == 60  # official train + test parts, pooled and split again
    assert 0.0 <= float(all_x.min()) and float(all_x.max()) <= 1.0
    limited = TorchvisionImages(dataset=dataset, root=str(tmp_path), limit=24, test_size=0.25)
    limited.setup()
    assert sum(len(t[1]) for t in limited.tensors.values()) == 24


@pytest.mark.parametrize(
    "dataset, expected",
    [
        ("mnist", "MNIST/raw"),
        ("fashion_mnist", "FashionMNIST/raw"),
        ("cifar10", "cifar-10-batches-py"),
    ],
)
def test_torchvision_images_missing_root(tmp_path, dataset, expected):
    root = tmp_path / "nowhere"
    dm = TorchvisionImages(dataset=dataset, root=str(root))
    with pytest.raises(DataError) as err:
        dm.setup()
    message = str(err.value)
    assert "\n" not in message
    assert str(root) in message and expected in message and "never downloads" in message
    assert not root.exists()  # nothing was created or downloaded


def test_torchvision_unknown_dataset():
    with pytest.raises(ConfigError, match="data.dataset"):
        TorchvisionImages(dataset="imagenet")


# --- sequences ---------------------------------------------------------------------------------
def test_noisy_sine_regression():
    dm = NoisySine(n_samples=200, window=12, noise=0.1)
    dm.setup()
    x, y = dm.tensors["train"]
    assert dm.task == "regression" and dm.num_outputs == 1
    assert dm.input_shape == (12, 1) and x.dtype == torch.float32 and y.dtype == torch.float32
    assert y.shape == (len(x),) and dm.input_range is None  # standardised by default
    assert not hasattr(dm, "classes") or dm.classes is None
    check_splits(lambda **kw: NoisySine(n_samples=100, window=5, **kw))


def test_noisy_sine_target_is_the_next_value():
    step = 0.3
    dm = NoisySine(n_samples=50, window=6, noise=0.0, step=step, standardize=False)
    dm.setup()
    x, y = dm.tensors["test"]
    # a sine obeys s[t+1] = 2 cos(step) s[t] - s[t-1]
    torch.testing.assert_close(y, 2 * math.cos(step) * x[:, -1, 0] - x[:, -2, 0], atol=1e-5, rtol=0)
    assert float(x.abs().max()) <= 1.0
    noisy = NoisySine(n_samples=50, window=6, noise=0.5, step=step, standardize=False)
    noisy.setup()
    assert not torch.allclose(noisy.tensors["test"][0], x)
    with pytest.raises(ConfigError, match="data.window"):
        NoisySine(window=0)


def test_digits_rows_match_digit_images():
    rows, images = DigitsRows(), DigitsImages()
    rows.setup(), images.setup()
    assert rows.input_shape == (8, 8) and rows.num_outputs == 10
    assert rows.input_range == (0.0, 1.0)
    torch.testing.assert_close(rows.tensors["test"][0], images.tensors["test"][0][:, 0])
    assert torch.equal(rows.tensors["test"][1], images.tensors["test"][1])
    check_splits(lambda **kw: DigitsRows(limit=200, **kw))


def test_mnist_rows():
    dm = MnistRows(limit=200)
    dm.setup()
    x, _ = dm.tensors["train"]
    assert dm.input_shape == (28, 28) and x.shape[1:] == (28, 28)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


# --- SequenceCSV -------------------------------------------------------------------------------
def write_csv(path: Path, n: int = 40, steps: int = 3, features: int = 2, labels=None) -> Path:
    cols = [f"t{t}_f{f}" for t in range(steps) for f in range(features)]
    lines = [",".join(["label", *cols])]
    for i in range(n):
        label = labels[i % len(labels)] if labels else str(i % 2)
        values = [f"{i + 0.01 * k:.2f}" for k in range(steps * features)]
        lines.append(",".join([label, *values]))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sequence_csv_reads_row_major_sequences(tmp_path):
    path = write_csv(tmp_path / "seq.csv", steps=3, features=2)
    dm = SequenceCSV(str(path), label_column="label", steps=3, features=2, standardize=False)
    dm.setup()
    assert dm.input_shape == (3, 2) and dm.num_outputs == 2
    x, y = dm.tensors["train"]
    first = x[0]
    base = float(first[0, 0])
    expected = torch.tensor([[0.0, 0.01], [0.02, 0.03], [0.04, 0.05]]) + base
    torch.testing.assert_close(first, expected)
    assert int(y[0]) == int(round(base)) % 2
    inferred = SequenceCSV(str(path), features=2)
    inferred.setup()
    assert inferred.input_shape == (3, 2)
    check_splits(lambda **kw: SequenceCSV(str(path), **kw))


def test_sequence_csv_label_mapping_and_positions(tmp_path):
    path = write_csv(tmp_path / "animals.csv", labels=["dog", "cat", "emu"])
    dm = SequenceCSV(str(path))
    dm.setup()
    assert dm.classes == ["cat", "dog", "emu"] and dm.num_outputs == 3
    numeric = write_csv(tmp_path / "numbers.csv", labels=["10", "3", "7"])
    dm = SequenceCSV(str(numeric), label_column=0)
    dm.setup()
    assert dm.classes == [3, 7, 10]  # numeric order, not string order
    assert set(torch.cat([t[1] for t in dm.tensors.values()]).tolist()) == {0, 1, 2}
    lines = numeric.read_text().splitlines()[1:]
    moved = tmp_path / "last.csv"
    moved.write_text("\n".join(",".join(r.split(",")[1:] + r.split(",")[:1]) for r in lines))
    dm = SequenceCSV(str(moved), label_column=-1, header=False, features=3)
    dm.setup()
    assert dm.input_shape == (2, 3) and dm.classes == [3, 7, 10]


def test_sequence_csv_regression(tmp_path):
    path = write_csv(tmp_path / "reg.csv", labels=["0.5", "1.25", "-2"])
    dm = SequenceCSV(str(path), task="regression")
    dm.setup()
    assert dm.task == "regression" and dm.num_outputs == 1
    y = torch.cat([t[1] for t in dm.tensors.values()])
    assert y.dtype == torch.float32 and set(y.tolist()) == {0.5, 1.25, -2.0}


def test_sequence_csv_from_its_config(tmp_path):
    path = write_csv(tmp_path / "seq.csv")
    node = load_preset("data", "sequence_csv")
    assert node.pop("name") == "sequence_csv" and node["path"] == "???"
    node["path"] = str(path)
    dm = instantiate(node)
    dm.setup()
    assert dm.input_shape == (6, 1)


@pytest.mark.parametrize(
    "content, kwargs, match",
    [
        (None, {}, "not found"),
        ("", {}, "empty"),
        ("label,a,b\n", {}, "empty"),
        ("label,a,b\n0,1,2\n1,3\n", {}, "line 3 has 2 fields, expected 3"),
        ("label,a,b\n0,1,2\n1,3,4,5\n", {}, "line 3 has 4 fields"),
        ("label,a,b,c\n0,1,2,3\n1,3,4,5\n", {"features": 2}, "3 feature columns"),
        ("label,a,b,c\n0,1,2,3\n1,3,4,5\n", {"steps": 2}, "3 feature columns"),
        ("label,a,b\n0,1,x\n1,3,4\n", {}, "line 2 holds a non-numeric value 'x'"),
        ("label,a,b\n0,1,2\n1,3,4\n", {"task": "regression", "label_column": "a"}, None),
        ("y,a,b\ncat,1,2\ndog,3,4\n", {"task": "regression", "label_column": "y"}, "not numeric"),
    ],
)
def test_sequence_csv_bad_files(tmp_path, content, kwargs, match):
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_text(content)
    dm = SequenceCSV(str(path), test_size=0.5, val_size=0.5, **kwargs)
    if match is None:  # a sane small file loads (the label column may be anywhere)
        assert dm.load_arrays()[0].shape == (2, 2, 1)
        return
    with pytest.raises(DataError, match=match) as err:
        dm.load_arrays()
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_sequence_csv_config_errors(tmp_path):
    path = write_csv(tmp_path / "seq.csv")
    with pytest.raises(ConfigError, match="data.label_column 'target'"):
        SequenceCSV(str(path), label_column="target").load_arrays()
    with pytest.raises(ConfigError, match="data.label_column 9"):
        SequenceCSV(str(path), label_column=9).load_arrays()
    with pytest.raises(ConfigError, match="integer position"):
        SequenceCSV(str(path), header=False, label_column="label")
    with pytest.raises(ConfigError, match="data.task"):
        SequenceCSV(str(path), task="ranking")


# --- configs -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "preset, shape, limit",
    [
        ("digits_images", (1, 8, 8), 200),
        ("mnist_subset", (1, 28, 28), 200),
        ("sine", (20, 1), None),
        ("digits_rows", (8, 8), 200),
        ("mnist_rows", (28, 28), 200),
    ],
)
def test_data_presets_instantiate(preset, shape, limit):
    node = load_preset("data", preset)
    assert node.pop("name") == preset
    if limit is not None:
        node["limit"] = limit
    dm = instantiate(node)
    dm.setup()
    assert dm.input_shape == shape


@pytest.mark.parametrize("preset", ["mnist", "fashion_mnist", "cifar10"])
def test_torchvision_presets_read_hdl_data_root(tmp_path, monkeypatch, preset):
    monkeypatch.setenv("HDL_DATA_ROOT", str(tmp_path))
    node = load_preset("data", preset)
    assert node.pop("name") == preset and node["root"] == str(tmp_path)
    dm = instantiate(node)
    with pytest.raises(DataError, match=re.escape(str(tmp_path))):
        dm.setup()
