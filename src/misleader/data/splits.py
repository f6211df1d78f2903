"""Deterministic, disjoint splits of a training set: defender train / validation / attacker pool.

Rules of honest evaluation (DESIGN.md): model selection uses the validation split, never the test
set; the defender's training data and an in-distribution attacker's data are disjoint. Both are
carved once, from the dataset's training part, by a seeded permutation; a victim folder records the
:class:`SplitSpec` so that later commands (defend, attack) recover exactly the same indices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class SplitSpec:
    """How to carve the training data. Fractions are of the full training set."""

    seed: int = 0
    val_fraction: float = 1 / 12
    attacker_fraction: float = 1 / 6

    def __post_init__(self) -> None:
        if not (0 < self.val_fraction < 1 and 0 <= self.attacker_fraction < 1):
            raise ValueError("val_fraction must be in (0, 1) and attacker_fraction in [0, 1)")
        if self.val_fraction + self.attacker_fraction >= 0.9:
            raise ValueError("val_fraction + attacker_fraction must leave at least 10% for training")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Splits:
    """Index tensors (int64) into the training set; pairwise disjoint, union = all rows."""

    train: torch.Tensor
    val: torch.Tensor
    attacker: torch.Tensor


def make_splits(n: int, spec: SplitSpec = SplitSpec()) -> Splits:
    """Split ``range(n)`` into train / val / attacker by a permutation seeded with ``spec.seed``.

    The permutation is independent of the run's seed so that every run on a dataset sees the same
    split unless the split seed is changed on purpose.

    Raises:
        ValueError: ``n`` is too small to leave at least one training row.
    """
    n_val = max(1, round(n * spec.val_fraction))
    n_att = round(n * spec.attacker_fraction)
    if n_val + n_att >= n:
        raise ValueError(
            f"cannot split {n} rows into {n_val} validation + {n_att} attacker rows "
            "and a non-empty training part"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(10_007 + spec.seed))
    return Splits(
        val=perm[:n_val].sort().values,
        attacker=perm[n_val : n_val + n_att].sort().values,
        train=perm[n_val + n_att :].sort().values,
    )
