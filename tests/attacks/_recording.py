"""Test helper: an oracle that keeps a copy of every batch it is asked."""

from __future__ import annotations

import torch

from misleader.oracle.base import ModelOracle


class RecordingOracle(ModelOracle):
    """A :class:`ModelOracle` that appends every queried batch (detached copy) to ``inputs``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.inputs: list[torch.Tensor] = []

    def query(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return super().query(x)
