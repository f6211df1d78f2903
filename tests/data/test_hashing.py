"""Content hashes of rows and the pool's disjointness from the defender's data by content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from misleader.attacks.pools import MAX_OVERLAP, load_pool
from misleader.data.hashing import overlap_mask, row_hashes
from misleader.errors import MisleaderError


def test_row_hashes_depend_on_content_shape_and_dtype():
    x = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 3, 4)
    h = row_hashes(x)
    assert len(h) == 2 and all(len(d) == 32 for d in h) and h[0] != h[1]
    assert row_hashes(x.clone()) == h  # content, not identity
    y = x.clone()
    y[1, 2, 3] ^= 1  # one bit of one pixel
    assert row_hashes(y)[0] == h[0] and row_hashes(y)[1] != h[1]
    assert row_hashes(x.reshape(2, 4, 3))[0] != h[0]  # same bytes, other shape
    assert row_hashes(x.to(torch.int16))[0] != h[0]
    assert row_hashes(x.transpose(1, 2)) == row_hashes(x.transpose(1, 2).contiguous())  # strides do not matter
    assert overlap_mask(y, h).tolist() == [True, False]


def _npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x_train=x, y_train=y, x_test=x[:2], y_test=y[:2])
    return path


def _target(tmp_path: Path, n: int = 120) -> tuple[dict, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = np.arange(n) % 10
    path = _npz(tmp_path / "victim_data.npz", x, y)
    return {"dataset": f"npz:{path}", "input_shape": [3, 32, 32], "split": {}}, x, y


def test_renamed_copy_of_the_defenders_data_is_refused(tmp_path):
    meta, x, y = _target(tmp_path)
    copy = _npz(tmp_path / "innocent_name.npz", x, y)  # other name, same rows
    with pytest.raises(MisleaderError, match="identical to the defender's"):
        load_pool(f"npz:{copy}", target_meta=meta)
    # the attacker split itself is fine and a pool of fresh images is untouched
    px, _ = load_pool("attacker", target_meta=meta)
    assert len(px) == 20
    fresh = _npz(tmp_path / "fresh.npz", np.random.default_rng(1).integers(0, 256, (50, 32, 32, 3), dtype=np.uint8),
                 np.arange(50) % 10)
    assert len(load_pool(f"npz:{fresh}", target_meta=meta)[0]) == 50


def test_a_few_identical_rows_are_dropped(tmp_path):
    from misleader.data import make_splits

    meta, x, y = _target(tmp_path)
    n = 300
    fresh = np.random.default_rng(2).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    train_row = int(make_splits(len(x)).train[0])
    fresh[17] = x[train_row]  # one defender training image inside the pool (1/300 < MAX_OVERLAP)
    assert 1 <= MAX_OVERLAP * n
    pool = _npz(tmp_path / "pool.npz", fresh, np.arange(n) % 10)
    px, py = load_pool(f"npz:{pool}", target_meta=meta)
    assert len(px) == n - 1 and len(py) == n - 1
    assert not overlap_mask(px, row_hashes(torch.from_numpy(x).permute(0, 3, 1, 2))).any()


def test_cifar10_subset_pool_against_a_cifar10_subset_victim_is_refused(shared_data):
    path = shared_data / "cifar-10-subset" / "cifar10_subset.npz"
    if not path.exists():
        pytest.skip(f"{path} missing")
    meta = {"dataset": f"npz:{path}", "input_shape": [3, 32, 32], "split": {}}
    with pytest.raises(MisleaderError, match="--pool attacker"):
        load_pool("cifar10-subset", target_meta=meta, data_dir=shared_data)
