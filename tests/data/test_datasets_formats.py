"""CIFAR pickles (built from the real CIFAR-10 subset), CIFAR-100 and SVHN .mat layouts."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from misleader.data import datasets, load_dataset
from misleader.errors import MisleaderError


@pytest.fixture
def no_md5(monkeypatch):
    """Fake CIFAR files cannot have torchvision's md5: switch the table off (the unpickler still applies)."""
    monkeypatch.setattr(datasets, "CIFAR_MD5", {})


def _subset(shared_data):
    path = shared_data / "cifar-10-subset" / "cifar10_subset.npz"
    if not path.exists():
        pytest.skip(f"{path} missing")
    return np.load(path)


def test_cifar10_pickles_in_torchvision_layout(tmp_path, shared_data, no_md5):
    d = _subset(shared_data)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    x = d["x_train"].transpose(0, 3, 1, 2).reshape(len(d["x_train"]), -1)  # CIFAR stores rows as CHW
    parts = np.array_split(np.arange(len(x)), 5)
    for i, idx in enumerate(parts, 1):
        with open(base / f"data_batch_{i}", "wb") as fh:
            pickle.dump({"data": x[idx], "labels": d["y_train"][idx].tolist()}, fh, protocol=4)
    xt = d["x_test"].transpose(0, 3, 1, 2).reshape(len(d["x_test"]), -1)
    with open(base / "test_batch", "wb") as fh:
        pickle.dump({"data": xt, "labels": d["y_test"].tolist()}, fh, protocol=4)
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [str(n) for n in d["label_names"]]}, fh, protocol=4)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.x_train.shape == (5085, 3, 32, 32) and ds.x_test.shape == (1017, 3, 32, 32)
    assert ds.class_names[0] == "airplane" and ds.num_classes == 10
    # same pixels as the npz (HWC) after the CHW round trip
    assert torch.equal(ds.x_train[7].permute(1, 2, 0), torch.from_numpy(d["x_train"][7]))
    assert torch.equal(ds.y_test, torch.from_numpy(d["y_test"].astype(np.int64)))


def test_cifar100_and_corrupted_pickle(tmp_path, no_md5):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 50), ("test", 20)):
        with open(base / name, "wb") as fh:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "fine_labels": (np.arange(n) % 100).tolist()}, fh, protocol=4)
    ds = load_dataset("cifar100", data_dir=tmp_path)
    assert ds.num_classes == 100 and ds.x_train.shape == (50, 3, 32, 32)
    (base / "test").write_bytes(b"\x80\x04garbage")
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


class _Payload:
    """Unpickling this runs ``touch MARKER`` (what a planted file would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("md5_on", [True, False], ids=["md5-checked", "unpickler-only"])
@pytest.mark.parametrize("victim_file", ["data_batch_1", "test_batch", "batches.meta"])
def test_planted_pickle_runs_nothing(tmp_path, monkeypatch, md5_on, victim_file):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(base / name, "wb") as fh:
            pickle.dump({"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}, fh,
                        protocol=4)
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, fh, protocol=4)
    marker = tmp_path / "pwned"
    with open(base / victim_file, "wb") as fh:
        pickle.dump({"data": _Payload(marker), "labels": [0], "label_names": _Payload(marker)}, fh, protocol=2)
    if md5_on:  # the other files are unknown to the table, so only the planted one is checked
        monkeypatch.setattr(datasets, "CIFAR_MD5", {"cifar-10-batches-py": {victim_file: "0" * 32}})
    else:
        monkeypatch.setattr(datasets, "CIFAR_MD5", {})
    with pytest.raises(MisleaderError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and victim_file in msg
    assert ("md5" in msg) if md5_on else ("posix.system" in msg or "os.system" in msg)
    assert not marker.exists()


def test_real_cifar_meta_passes_the_md5_and_unpickler(tmp_path, shared_data):
    real = shared_data / "cifar-10-subset" / "batches.meta"
    if not real.exists():
        pytest.skip(f"{real} missing")
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    (base / "batches.meta").write_bytes(real.read_bytes())
    names = datasets._unpickle(base / "batches.meta", "label_names")["label_names"]
    assert names[:2] == ["airplane", "automobile"] and len(names) == 10
    (base / "batches.meta").write_bytes(real.read_bytes() + b"\0")  # one byte more: md5 differs
    with pytest.raises(MisleaderError, match="md5"):
        datasets._unpickle(base / "batches.meta", "label_names")


def test_cifar_batch_with_wrong_shape_is_one_line_error(tmp_path, no_md5):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for name in ("train", "test"):
        with open(base / name, "wb") as fh:
            pickle.dump({"data": np.zeros((3, 100), np.uint8), "fine_labels": [0, 1, 2]}, fh, protocol=4)
    with pytest.raises(MisleaderError, match="uint8 \\(N, 3072\\)"):
        load_dataset("cifar100", data_dir=tmp_path)
