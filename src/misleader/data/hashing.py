"""Content hashes of image rows: what "the attacker's pool holds none of the defender's data" compares.

Names and paths say nothing about content (the CIFAR-10 subset under another name *is* the defender's
data), so disjointness is checked on the bytes of each row: the sha256 of its shape, dtype and pixels.

Example:
    >>> import torch
    >>> x = torch.tensor([[[[1, 2], [3, 4]]], [[[1, 2], [3, 4]]], [[[0, 0], [0, 0]]]], dtype=torch.uint8)
    >>> h = row_hashes(x)
    >>> len(h), h[0] == h[1], h[0] == h[2]
    (3, True, False)
    >>> overlap_mask(x, h[2:]).tolist()
    [False, False, True]
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np
import torch


def row_hashes(x: torch.Tensor) -> list[bytes]:
    """sha256 digest (32 bytes) of every row of ``x``.

    Shape: (N, ...) any dtype -> N digests. Each digest covers the row's shape and dtype as well as its
    bytes, so rows that only differ in layout do not collide. The rows are one contiguous numpy buffer
    hashed through zero-copy memoryviews (no per-row tensor indexing).
    """
    if x.dim() < 1:
        raise ValueError(f"expected a tensor of rows (N, ...), got shape {tuple(x.shape)}")
    arr = np.ascontiguousarray(x.detach().cpu().numpy())
    rows = arr.reshape(len(arr), -1)
    header = f"{tuple(arr.shape[1:])}|{arr.dtype.str}|".encode()
    base = hashlib.sha256(header)
    out = []
    for row in rows:
        h = base.copy()
        h.update(memoryview(row))
        out.append(h.digest())
    return out


def overlap_mask(x: torch.Tensor, reference: Iterable[bytes]) -> torch.Tensor:
    """bool (N,): which rows of ``x`` have the same content hash as a row of ``reference``."""
    ref = reference if isinstance(reference, (set, frozenset)) else set(reference)
    return torch.tensor([h in ref for h in row_hashes(x)], dtype=torch.bool)


__all__ = ["overlap_mask", "row_hashes"]
