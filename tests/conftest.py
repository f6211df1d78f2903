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
