"""Tensor-resident batching: uint8 images live on the device; batches become float [0, 1] there.

No workers, no per-sample Python: the whole split is moved to the device once (airbench-style), and
each batch is an index into it.
"""

from __future__ import annotations

from typing import Iterator

import torch


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1]; a float input is returned as float32 unchanged."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


class TensorLoader:
    """Iterate over (x, y) mini-batches of tensors already on ``device``.

    Args:
        x: uint8 (N, C, H, W) images (or float in [0, 1]).
        y: int64 (N,) labels (or any (N, ...) tensor, e.g. soft labels).
        batch_size: rows per batch.
        shuffle: reshuffle at every ``iter()`` using ``generator``.
        generator: a ``torch.Generator`` for the permutations (seeded by the caller; default seed 0).
        device: where batches live.
        drop_last: drop the final incomplete batch.

    Yields:
        (float32 (B, C, H, W) in [0, 1], y batch) on ``device``.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.device = torch.device(device)
        self.x = x.to(self.device)
        self.y = y.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator, device=self.generator.device).to(self.device)
        else:
            order = None
        stop = (n // self.batch_size) * self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            if order is None:
                xb, yb = self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]
            else:
                idx = order[start : start + self.batch_size]
                xb, yb = self.x[idx], self.y[idx]
            yield to_unit(xb), yb

    def forever(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Cycle through epochs without end (a fresh shuffle each pass)."""
        while True:
            yield from self
