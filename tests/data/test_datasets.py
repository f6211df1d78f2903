"""Dataset loaders on the real files, their errors, splits and the tensor loader."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from misleader.data import SplitSpec, TensorLoader, list_datasets, load_dataset, make_splits
from misleader.data.datasets import read_idx
from misleader.errors import MisleaderError

IDX = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
       "t10k-labels-idx1-ubyte.gz"]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def mnist(shared_data):
    _need(shared_data / "MNIST" / "raw" / IDX[0])
    return load_dataset("mnist", data_dir=shared_data)


@pytest.fixture(scope="module")
def fashion(shared_data):
    _need(shared_data / "FashionMNIST" / "raw" / IDX[0])
    return load_dataset("fashion-mnist", data_dir=shared_data)


@pytest.fixture(scope="module")
def cifar_npz(shared_data) -> Path:
    return _need(shared_data / "cifar-10-subset" / "cifar10_subset.npz")


# --------------------------------------------------------------------------- real files


@pytest.mark.parametrize("which", ["mnist", "fashion"])
def test_mnist_family_shapes_and_padding(request, which):
    ds = request.getfixturevalue(which)
    assert ds.x_train.shape == (60000, 1, 32, 32) and ds.x_test.shape == (10000, 1, 32, 32)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert ds.y_train.shape == (60000,) and ds.y_test.shape == (10000,)
    assert ds.num_classes == 10 and len(ds.class_names) == 10
    assert ds.input_shape == (1, 32, 32) and ds.in_channels == 1
    for x in (ds.x_train, ds.x_test):  # 28x28 zero-padded by 2 on each side
        assert x[..., :2, :].eq(0).all() and x[..., -2:, :].eq(0).all()
        assert x[..., :, :2].eq(0).all() and x[..., :, -2:].eq(0).all()
        assert x[..., 2:30, 2:30].amax() == 255


def test_mnist_label_counts(mnist):
    assert torch.bincount(mnist.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    train_counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(mnist.y_train).tolist() == train_counts
    assert mnist.class_names == [str(i) for i in range(10)]


def test_fashion_label_counts(fashion):
    assert torch.bincount(fashion.y_test).tolist() == [1000] * 10
    assert torch.bincount(fashion.y_train).tolist() == [6000] * 10
    assert fashion.class_names[0] == "T-shirt/top" and fashion.class_names[-1] == "Ankle boot"


def test_cifar10_subset_via_npz(cifar_npz):
    ds = load_dataset(f"npz:{cifar_npz}")
    assert ds.name == f"npz:{cifar_npz}"
    assert ds.x_train.shape == (5085, 3, 32, 32) and ds.x_test.shape == (1017, 3, 32, 32)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert ds.num_classes == 10 and ds.class_names == CIFAR10_NAMES
    raw = np.load(cifar_npz)["x_train"]  # NHWC -> NCHW without reordering pixels
    assert torch.equal(ds.x_train[7], torch.from_numpy(raw[7]).permute(2, 0, 1))


def test_digits_embedded():
    ds = load_dataset("digits", data_dir="/nonexistent")
    assert ds.num_classes == 10 and ds.x_train.shape[1:] == (1, 32, 32)
    assert len(ds.x_train) + len(ds.x_test) == 1797 and len(ds.x_test) == 1797 // 5
    assert set(ds.y_train.tolist()) == set(range(10))
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.max() > 200


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "cifar100", "svhn"])
def test_missing_dataset_says_how_to_fix(tmp_path, name):
    with pytest.raises(MisleaderError) as info:
        load_dataset(name, data_dir=tmp_path)
    assert "--data-dir" in str(info.value) and "MISLEADER_DATA" in str(info.value)
    assert "--download" not in str(info.value)  # no command has such a flag
    assert f"download_dataset({name!r}" in str(info.value)


def test_data_dir_defaults_to_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MISLEADER_DATA", str(tmp_path / "from-env"))
    with pytest.raises(MisleaderError, match="from-env"):
        load_dataset("mnist")


def test_unknown_name_lists_the_names():
    with pytest.raises(MisleaderError) as info:
        load_dataset("mnits")
    msg = str(info.value)
    assert "did you mean 'mnist'" in msg
    for name in ("digits", "fashion-mnist", "cifar10", "svhn"):
        assert name in msg
    assert "npz:PATH" in list_datasets()


def _mnist_copy(tmp_path: Path, shared_data: Path) -> Path:
    raw = _need(shared_data / "MNIST" / "raw")
    dst = tmp_path / "MNIST" / "raw"
    dst.mkdir(parents=True)
    for f in IDX:
        (dst / f).symlink_to(_need(raw / f))
    return dst


def test_truncated_gz_raises(tmp_path, shared_data):
    dst = _mnist_copy(tmp_path, shared_data)
    good = (dst / IDX[0]).read_bytes()
    (dst / IDX[0]).unlink()
    (dst / IDX[0]).write_bytes(good[:5000])
    with pytest.raises(MisleaderError, match="download again"):
        load_dataset("mnist", data_dir=tmp_path)


def test_truncated_idx_payload_raises(tmp_path, shared_data):
    dst = _mnist_copy(tmp_path, shared_data)
    labels = gzip.decompress((dst / IDX[3]).read_bytes())
    (dst / IDX[3]).unlink()
    (dst / IDX[3]).write_bytes(gzip.compress(labels[:-100]))  # a valid gzip of a truncated idx
    with pytest.raises(MisleaderError, match="truncated"):
        load_dataset("mnist", data_dir=tmp_path)


def test_read_idx_rejects_garbage(tmp_path):
    (tmp_path / "x-idx3-ubyte").write_bytes(b"\x00\x00")
    with pytest.raises(MisleaderError):
        read_idx(tmp_path / "x-idx3-ubyte")
    (tmp_path / "y.gz").write_bytes(b"this is not gzip at all")
    with pytest.raises(MisleaderError):
        read_idx(tmp_path / "y.gz")


def test_mismatched_mnist_files_raise(tmp_path, shared_data):
    dst = _mnist_copy(tmp_path, shared_data)
    (dst / IDX[1]).unlink()
    (dst / IDX[1]).symlink_to(shared_data / "MNIST" / "raw" / IDX[3])  # 10k test labels for 60k train images
    with pytest.raises(MisleaderError, match="do not match"):
        load_dataset("mnist", data_dir=tmp_path)


def _arrays(n: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x_train": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), "y_train": rng.integers(0, 3, n),
            "x_test": rng.integers(0, 256, (n // 2, 28, 28), dtype=np.uint8),
            "y_test": rng.integers(0, 3, n // 2)}


def test_npz_with_missing_array_raises(tmp_path):
    arrays = _arrays()
    del arrays["y_test"]
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(MisleaderError, match="y_test"):
        load_dataset(f"npz:{tmp_path / 'd.npz'}")


@pytest.mark.parametrize("problem,match", [
    ("truncated", "cannot read|corrupted"), ("npy", "single .npy"), ("missing-file", "not found"),
    ("length", "rows but y_train has"), ("float-range", "uint8 or float in \\[0, 1\\]"),
    ("neg-label", "integer labels >= 0"), ("int-pixels", "uint8 or float .* got int64"),
    ("size-64", "64x64; a dataset's images must be 28x28 or 32x32"), ("channels-2", "1 or 3 channels"),
    ("ndim-5", "must have shape"), ("shape-mismatch", "differ in shape"),
])
def test_npz_problems_raise(tmp_path, problem, match):
    path = tmp_path / "d.npz"
    arrays = _arrays()
    if problem == "length":
        arrays["y_train"] = arrays["y_train"][:-1]
    elif problem == "float-range":
        arrays["x_train"] = arrays["x_train"].astype(np.float32)  # 0..255 floats, not [0, 1]
    elif problem == "neg-label":
        arrays["y_test"][0] = -1
    elif problem == "int-pixels":
        arrays["x_train"] = arrays["x_train"].astype(np.int64)
    elif problem == "size-64":
        arrays["x_train"] = np.zeros((20, 64, 64, 3), np.uint8)
    elif problem == "channels-2":
        arrays["x_train"] = np.zeros((20, 2, 32, 32), np.uint8)
    elif problem == "ndim-5":
        arrays["x_train"] = np.zeros((20, 1, 1, 32, 32), np.uint8)
    elif problem == "shape-mismatch":
        arrays["x_test"] = np.zeros((10, 32, 32, 3), np.uint8)
    np.savez(path, **arrays)
    if problem == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    elif problem == "npy":
        np.save(tmp_path / "d.npy", arrays["x_train"])
        path.unlink()
        (tmp_path / "d.npy").rename(path)
    elif problem == "missing-file":
        path.unlink()
    with pytest.raises(MisleaderError, match=match) as info:
        load_dataset(f"npz:{path}")
    assert "\n" not in str(info.value)


def test_npz_of_any_size_is_accepted_as_a_pool(tmp_path):
    arrays = _arrays()
    arrays["x_train"] = np.zeros((20, 64, 48, 3), np.uint8)
    arrays["x_test"] = np.zeros((10, 64, 48, 3), np.uint8)
    np.savez(tmp_path / "big.npz", **arrays)
    assert load_dataset(f"npz:{tmp_path / 'big.npz'}", any_size=True).x_train.shape == (20, 3, 64, 48)


def test_npz_layouts(tmp_path):
    arrays = _arrays()
    np.savez(tmp_path / "gray.npz", **arrays)
    ds = load_dataset(f"npz:{tmp_path / 'gray.npz'}")
    assert ds.x_train.shape == (20, 1, 32, 32) and ds.num_classes == 3  # 28x28 padded to 32x32
    arrays["x_train"] = np.random.default_rng(1).random((20, 3, 32, 32), dtype=np.float32)
    arrays["x_test"] = np.zeros((10, 3, 32, 32), dtype=np.float32)
    np.savez(tmp_path / "float.npz", **arrays, label_names=np.array(["a", "b", "c", "d"]))
    ds = load_dataset(f"npz:{tmp_path / 'float.npz'}")
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_train.dtype == torch.uint8
    assert ds.num_classes == 4 and ds.class_names == ["a", "b", "c", "d"]


# --------------------------------------------------------------------------- splits


@settings(max_examples=60, deadline=None)
@given(n=st.integers(20, 3000), val=st.floats(0.01, 0.45), att=st.floats(0.0, 0.44),
       seed=st.integers(0, 10**6))
def test_splits_disjoint_cover_deterministic(n, val, att, seed):
    spec = SplitSpec(seed=seed, val_fraction=val, attacker_fraction=att)
    s = make_splits(n, spec)
    parts = [s.train, s.val, s.attacker]
    everything = torch.cat(parts)
    assert everything.dtype == torch.int64
    assert len(everything) == n and torch.equal(everything.sort().values, torch.arange(n))  # disjoint + cover
    assert len(s.train) > 0 and len(s.val) >= 1
    assert len(s.val) == max(1, round(n * val)) and len(s.attacker) == round(n * att)
    again = make_splits(n, SplitSpec(seed=seed, val_fraction=val, attacker_fraction=att))
    assert all(torch.equal(a, b) for a, b in zip(parts, [again.train, again.val, again.attacker]))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(200, 3000), val=st.floats(0.05, 0.4), seed=st.integers(0, 10**6))
def test_splits_differ_across_seeds(n, val, seed):
    a = make_splits(n, SplitSpec(seed=seed, val_fraction=val, attacker_fraction=0.1))
    b = make_splits(n, SplitSpec(seed=seed + 1, val_fraction=val, attacker_fraction=0.1))
    assert not torch.equal(a.val, b.val)


def test_split_spec_validation():
    with pytest.raises(ValueError):
        SplitSpec(val_fraction=0.0)
    with pytest.raises(ValueError):
        SplitSpec(val_fraction=0.5, attacker_fraction=0.45)
    with pytest.raises(ValueError):
        make_splits(1)  # no row left for training
    spec = SplitSpec(seed=3)
    assert SplitSpec(**spec.to_dict()) == spec  # what a victim folder records rebuilds the same split
    s = make_splits(60_000)  # the defaults give the paper's MNIST split: 45k defender, 5k validation, 10k attacker
    assert (len(s.train), len(s.val), len(s.attacker)) == (45_000, 5_000, 10_000)


# --------------------------------------------------------------------------- loader


def _rows(n: int = 103) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(n, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2)
    return x.contiguous(), torch.arange(n)


def test_loader_yields_unit_floats_and_covers_every_row_once(seed):
    x, y = _rows()
    loader = TensorLoader(x, y, batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(seed))
    assert len(loader) == 11
    orders = []
    for _ in range(2):
        seen = []
        for xb, yb in loader:
            assert xb.dtype == torch.float32 and 0 <= xb.min() and xb.max() <= 1
            assert torch.allclose(xb[:, 0, 0, 0], (yb % 256).float() / 255)  # rows stay paired with labels
            seen.append(yb)
        order = torch.cat(seen)
        assert torch.equal(order.sort().values, y)
        orders.append(order)
    assert not torch.equal(orders[0], orders[1])  # reshuffled each epoch
    assert not torch.equal(orders[0], y)


def test_loader_is_reproducible_and_ordered_without_shuffle():
    x, y = _rows()
    def epoch() -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(5)
        return [yb for _, yb in TensorLoader(x, y, batch_size=16, shuffle=True, generator=g)]

    a, b = epoch(), epoch()
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    plain = torch.cat([yb for _, yb in TensorLoader(x, y, batch_size=16)])
    assert torch.equal(plain, y)


@pytest.mark.parametrize("n,bs,drop,expected", [(103, 10, True, 10), (103, 10, False, 11),
                                                 (100, 10, True, 10), (9, 10, True, 0), (9, 10, False, 1)])
def test_loader_len_with_drop_last(n, bs, drop, expected):
    x, y = _rows(n)
    loader = TensorLoader(x, y, batch_size=bs, shuffle=True, drop_last=drop)
    batches = list(loader)
    assert len(loader) == expected == len(batches)
    if drop:
        assert all(len(yb) == bs for _, yb in batches)
    else:
        assert sum(len(yb) for _, yb in batches) == n


def test_loader_rejects_bad_arguments():
    x, y = _rows(10)
    with pytest.raises(ValueError):
        TensorLoader(x, y[:5], batch_size=2)
    with pytest.raises(ValueError):
        TensorLoader(x, y, batch_size=0)
