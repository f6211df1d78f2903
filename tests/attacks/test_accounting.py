"""The shared query ledger of DFME and DFMS-HL (attacks/accounting.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from misleader.attacks.accounting import QueryLedger, device_generator
from misleader.oracle import ModelOracle


def _oracle(budget: int) -> ModelOracle:
    torch.manual_seed(0)
    return ModelOracle(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), num_classes=3, input_shape=(1, 4, 4),
                       budget=budget)


def test_ledger_counts_rows_and_agrees_with_the_oracle():
    oracle = _oracle(100)
    oracle.query(torch.rand(7, 1, 4, 4))  # rows answered before the attack are not the attack's
    ledger = QueryLedger(oracle, attack="test")
    for n in (5, 1, 30):
        out = ledger.query(torch.rand(n, 1, 4, 4))
        assert out.shape == (n, 3)
    assert ledger.spent == 36
    ledger.check(expected=36)
    with pytest.raises(RuntimeError, match="expected 35"):
        ledger.check(expected=35)
    oracle.query(torch.rand(2, 1, 4, 4))  # a row that bypassed the ledger is caught
    with pytest.raises(RuntimeError, match="oracle counted 38, attack 36"):
        ledger.check(expected=36)


def test_device_generator_is_the_same_generator_on_its_device():
    g = torch.Generator().manual_seed(3)
    assert device_generator(g, torch.device("cpu")) is g
