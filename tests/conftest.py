"""Shared fixtures: where the real data sets are, and a seeded RNG."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder: ``$MISLEADER_DATA`` if set, else ``<repo>/../shared/data``; skips if absent."""
    env = os.environ.get("MISLEADER_DATA")
    path = Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"real data folder {path} not found: set MISLEADER_DATA to the folder holding MNIST/raw")
    return path


@pytest.fixture
def seed() -> int:
    """Seed Python's, numpy's and torch's global RNGs with 0 and return the seed."""
    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return 0


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Every test module runs torch on one intra-op thread: the tiny models are fastest so, the shared
    2-core machine stays usable, and results are bitwise comparable with a Ray task (num_cpus=1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    """One torch thread during the test, like a Ray task with num_cpus=1 (bitwise-comparable results)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_victim(tmp_path_factory) -> Path:
    """A victim folder: lenet5_fifth trained 3 epochs on the embedded digits (about a second; seed 0)."""
    from misleader.training.victim import train_victim

    out = tmp_path_factory.mktemp("tiny_victim") / "victim"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster, above all on a shared machine
    try:
        train_victim(dataset="digits", arch="lenet5_fifth", epochs=3, out=out, device="cpu", seed=0)
    finally:
        torch.set_num_threads(threads)
    return out
