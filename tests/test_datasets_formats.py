"""CIFAR pickles (built from the real CIFAR-10 subset), CIFAR-100 and SVHN .mat layouts."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from misleader.data import load_dataset


def _subset(shared_data):
    path = shared_data / "cifar-10-subset" / "cifar10_subset.npz"
    if not path.exists():
        pytest.skip(f"{path} missing")
    return np.load(path)


def test_cifar10_pickles_in_torchvision_layout(tmp_path, shared_data):
    d = _subset(shared_data)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    x = d["x_train"].transpose(0, 3, 1, 2).reshape(len(d["x_train"]), -1)  # CIFAR stores rows as CHW
    parts = np.array_split(np.arange(len(x)), 5)
    for i, idx in enumerate(parts, 1):
        with open(base / f"data_batch_{i}", "wb") as fh:
            pickle.dump({"data": x[idx], "labels": d["y_train"][idx].tolist()}, fh)
    xt = d["x_test"].transpose(0, 3, 1, 2).reshape(len(d["x_test"]), -1)
    with open(base / "test_batch", "wb") as fh:
        pickle.dump({"data": xt, "labels": d["y_test"].tolist()}, fh)
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [str(n) for n in d["label_names"]]}, fh)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.x_train.shape == (5085, 3, 32, 32) and ds.x_test.shape == (1017, 3, 32, 32)
    assert ds.class_names[0] == "airplane" and ds.num_classes == 10
    # same pixels as the npz (HWC) after the CHW round trip
    assert torch.equal(ds.x_train[7].permute(1, 2, 0), torch.from_numpy(d["x_train"][7]))
    assert torch.equal(ds.y_test, torch.from_numpy(d["y_test"].astype(np.int64)))


def test_cifar100_and_corrupted_pickle(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 50), ("test", 20)):
        with open(base / name, "wb") as fh:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "fine_labels": (np.arange(n) % 100).tolist()}, fh)
    ds = load_dataset("cifar100", data_dir=tmp_path)
    assert ds.num_classes == 100 and ds.x_train.shape == (50, 3, 32, 32)
    (base / "test").write_bytes(b"\x80\x04garbage")
    from misleader import MisleaderError

    with pytest.raises(MisleaderError, match="corrupted"):
        load_dataset("cifar100", data_dir=tmp_path)


def test_svhn_mat_label_10_is_digit_0(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    base = tmp_path / "svhn"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train_32x32.mat", 12), ("test_32x32.mat", 6)):
        y = (np.arange(n) % 10 + 1).reshape(-1, 1)  # SVHN stores digit 0 as 10
        scipy_io.savemat(base / name, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": y})
    ds = load_dataset("svhn", data_dir=tmp_path)
    assert ds.x_train.shape == (12, 3, 32, 32)
    assert ds.y_train.min() == 0 and ds.y_train.max() == 9 and int(ds.y_train[9]) == 0
