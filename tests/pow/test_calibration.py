"""Calibration arithmetic: fit, deviation -> seconds -> bits, the caps."""

from __future__ import annotations

import math

import pytest
import torch

from misleader.errors import MisleaderError
from misleader.pow.calibration import REFERENCE_RATE, PowConfig, base_for, fit_cost_per_query
from misleader.pow.puzzle import MAX_BITS


def _cfg(**kw) -> PowConfig:
    args = dict(cost_per_query=0.5, base=2.0, honest_seconds=0.01, hash_rate=1024.0 * 100)
    args.update(kw)
    return PowConfig(**args)


def test_fit_by_hand() -> None:
    # points (1, 2), (2, 3): slope = (1*2 + 2*3) / (1 + 4) = 8 / 5 = 1.6
    assert fit_cost_per_query(torch.tensor([1, 2]), torch.tensor([2.0, 3.0])) == pytest.approx(1.6)


def test_seconds_and_bits_by_hand() -> None:
    c = _cfg()
    # deviation 0: t = 0.01 s; 0.01 * 102400 = 1024 hashes -> 10 bits -> 2^10 / 102400 = 0.01 s
    assert c.seconds(0.0) == pytest.approx(0.01) and c.bits(0.0) == 10
    assert c.puzzle_seconds(10) == pytest.approx(0.01)
    # deviation 3: t = 0.01 * 2^3 = 0.08 s -> 8192 hashes -> 13 bits
    assert c.seconds(3.0) == pytest.approx(0.08) and c.bits(3.0) == 13
    assert c.deviation(cost=10.0, queries=10) == pytest.approx(5.0)  # |10 - 0.5 * 10|
    assert c.deviation(cost=1.0, queries=10) == pytest.approx(4.0)  # spending less is a deviation too


def test_clamps_and_the_bits_cap() -> None:
    c = _cfg()
    assert c.seconds(1e9) == pytest.approx(0.01 * 2948.0)  # max_factor
    assert _cfg(base=1.0).seconds(1e9) == pytest.approx(0.01)
    fast = _cfg(hash_rate=1e15, max_bits=MAX_BITS)
    for d in (0.0, 1.0, 10.0, 1e3, 1e12, math.inf):
        assert 0 <= fast.bits(d) <= MAX_BITS
    assert fast.bits(1e12) == MAX_BITS
    assert _cfg(max_bits=12).bits(1e6) == 12
    with pytest.raises(MisleaderError):
        _cfg(max_bits=MAX_BITS + 1)
    with pytest.raises(MisleaderError):
        _cfg(base=0.5)


def test_base_transfers_the_reference_rate() -> None:
    # the reference: base 1.0075 at honest cost 0.259 per query
    assert base_for(0.259) == pytest.approx(1.0075)
    # a meter with 10x the cost scale gets the 10th root: same delay per honest query's worth of deviation
    assert math.log(base_for(2.59)) * 2.59 == pytest.approx(REFERENCE_RATE)
