"""The attacker's own data: query pools for Knockoff Nets and proxy sets for DFMS-HL.

A pool is named by a *spec*:

=====================  ===================================================================
``attacker``           the target's in-distribution attacker split (disjoint from the
                       defender's training and validation data; DESIGN.md rule 3). Default.
a dataset name         the *training* part of another registered dataset (``digits``,
                       ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``, ``svhn``).
``cifar10-subset``     the real 5k CIFAR-10 subset shipped in ``<data_dir>/cifar-10-subset``
                       (a shortcut for ``npz:<data_dir>/cifar-10-subset/cifar10_subset.npz``).
``npz:PATH``           the training part of a user's arrays (see :mod:`misleader.data.datasets`).
=====================  ===================================================================

Images are converted to the target's ``input_shape``: 3 -> 1 channel by ITU-R 601 luminance
(0.299 R + 0.587 G + 0.114 B, what PIL's ``convert("L")`` does), 1 -> 3 by repetition, and a bilinear
(antialiased) resize when the height or width differs. Naming the target's own dataset is refused:
its training part contains the defender's data; use ``attacker`` instead. Whatever its name, a pool
is then compared *by content* (sha256 of each converted row) with the defender's training and
validation rows: a pool that is mostly the defender's data is refused, a few identical rows are
dropped (:func:`drop_defender_rows`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from misleader.data import Dataset, Splits, load_dataset, resolve_data_dir
from misleader.data.hashing import overlap_mask, row_hashes
from misleader.errors import MisleaderError

log = logging.getLogger(__name__)

#: luminance weights for RGB -> gray (ITU-R 601-2, as PIL)
LUMA = (0.299, 0.587, 0.114)
ALIASES = {"cifar10-subset": "cifar-10-subset/cifar10_subset.npz"}


def convert_images(x: torch.Tensor, shape: Sequence[int], *, chunk: int = 4096) -> torch.Tensor:
    """Convert uint8 images to ``shape`` = (C, H, W): channels (3->1 luminance, 1->3 repeat), then size.

    Shape: (N, C', H', W') uint8 -> (N, C, H, W) uint8. Works in chunks of ``chunk`` rows to bound memory.

    Raises:
        MisleaderError: a channel conversion other than 1<->3.
    """
    c, h, w = (int(s) for s in shape)
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"expected uint8 (N, C, H, W) images, got {x.dtype} {tuple(x.shape)}")
    src_c = int(x.shape[1])
    if src_c != c and not {src_c, c} <= {1, 3}:
        raise MisleaderError(f"cannot convert {src_c}-channel pool images to {c} channels (only 1 <-> 3 is "
                             "supported): choose a pool with matching channels")
    if src_c == c and tuple(x.shape[2:]) == (h, w):
        return x
    out = []
    luma = torch.tensor(LUMA).view(1, 3, 1, 1)
    for part in x.split(chunk):
        f = part.float()
        if src_c == 3 and c == 1:
            f = (f * luma).sum(1, keepdim=True)
        elif src_c == 1 and c == 3:
            f = f.repeat(1, 3, 1, 1)
        if tuple(f.shape[2:]) != (h, w):
            f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        out.append(f.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


#: a pool whose rows are more than this fraction the defender's own is refused (a wrong pool, not a
#: coincidence); fewer such rows are dropped from the pool with a warning.
MAX_OVERLAP = 0.01


def drop_defender_rows(x: torch.Tensor, y: torch.Tensor | None, *, spec: str,
                       defender_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Remove the pool rows whose content equals a defender training or validation row (DESIGN.md rule 3).

    Compares sha256 content hashes (:mod:`misleader.data.hashing`), so renaming or copying the defender's
    data does not get it into a pool. Shapes: x uint8 (N, C, H, W) in the target's input shape, y (N,)
    or None, defender_x (M, C, H, W) -> the kept rows of x and y.

    Raises:
        MisleaderError: more than :data:`MAX_OVERLAP` of the pool is the defender's data.
    """
    if tuple(x.shape[1:]) != tuple(defender_x.shape[1:]):
        return x, y  # different content shapes cannot share a row
    overlap = overlap_mask(x, row_hashes(defender_x))
    n = int(overlap.sum())
    if n == 0:
        return x, y
    if n > MAX_OVERLAP * len(x):
        raise MisleaderError(f"pool {spec!r} holds {n} of {len(x)} images identical to the defender's training or "
                             "validation images: use --pool attacker (the disjoint attacker split) or a pool "
                             "from another source")
    log.warning("pool %r: dropped %d images identical to the defender's training or validation images", spec, n)
    keep = ~overlap
    return x[keep], (y[keep] if y is not None else None)


def load_pool(
    spec: str | None,
    *,
    target_meta: dict[str, Any],
    data_dir: str | Path | None = None,
    target_data: tuple[Dataset, Splits] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Build the attacker's query pool.

    Args:
        spec: ``"attacker"`` (default when ``None``), a dataset name, ``"cifar10-subset"`` or ``"npz:PATH"``.
        target_meta: the target folder's metadata (:func:`misleader.oracle.load.describe_target`):
            ``dataset``, ``split``, ``input_shape``.
        data_dir: dataset root (default ``$MISLEADER_DATA`` or ``./data``).
        target_data: the target's ``(Dataset, Splits)`` if the caller already loaded them (saves a reload).

    Returns:
        ``(x, y)``: uint8 (N, *input_shape) images and the pool's own int64 (N,) labels (``None`` when it
        has none).

    Raises:
        MisleaderError: unknown or unreadable dataset, the target's own dataset named, a pool that is mostly
            the defender's training or validation data (compared by content), empty pool.
    """
    spec = spec or "attacker"
    shape = [int(s) for s in target_meta["input_shape"]]
    target_ds = target_meta.get("dataset")
    if spec != "attacker" and spec == target_ds:
        raise MisleaderError(f"pool {spec!r} is the target's own dataset, whose training part holds the "
                             "defender's data: use --pool attacker (the disjoint attacker split)")
    if target_data is None:
        from misleader.training.victim import load_target_data

        target_data = load_target_data(target_meta, data_dir=data_dir)
    data, splits = target_data
    if spec == "attacker":
        idx = splits.attacker
        if len(idx) == 0:
            raise MisleaderError(f"the target's split of {target_ds!r} holds no attacker images "
                                 "(attacker_fraction = 0): name another pool with --pool")
        x, y = data.x_train[idx], data.y_train[idx]
    else:
        name = spec
        if spec in ALIASES:
            name = "npz:" + str(resolve_data_dir(data_dir) / ALIASES[spec])
        pool_data = load_dataset(name, data_dir=data_dir, any_size=True)
        x, y = pool_data.x_train, pool_data.y_train
    if len(x) == 0:
        raise MisleaderError(f"pool {spec!r} is empty: choose another pool")
    x = convert_images(x, shape)
    x, y = drop_defender_rows(x, y, spec=spec, defender_x=data.x_train[torch.cat([splits.train, splits.val])])
    log.info("pool %r: %d images %s, %s", spec, len(x), tuple(x.shape[1:]),
             f"{int(y.unique().numel())} classes" if y is not None else "unlabelled")
    return x.contiguous(), (y.long().contiguous() if y is not None else None)


__all__ = ["MAX_OVERLAP", "convert_images", "drop_defender_rows", "load_pool", "LUMA"]
