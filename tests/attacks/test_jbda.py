"""JBDA: exact budget, accounting equals the oracle's count, same seed -> same clone, augmentation step."""

from __future__ import annotations

import pytest
import torch

from misleader.attacks.jbda import JBDA
from misleader.errors import MisleaderError
from misleader.models import create_model
from misleader.oracle import ModelOracle

SHAPE = (1, 32, 32)


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("lenet5_fifth", in_channels=1, num_classes=5)


def _run(budget: int, *, output: str = "probs", seed: int = 0, **kw):
    victim = _net(123)
    oracle = ModelOracle(victim, num_classes=5, input_shape=SHAPE, output=output, budget=budget)
    pool = torch.randint(0, 256, (40, *SHAPE), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    a = JBDA(**{"seeds": 10, "epochs_per_round": 1, "final_epochs": 1, "query_batch": 16, **kw})
    a.prepare(pool_x=pool)
    rows = []
    res = a.run(oracle.sealed(), budget=budget, clone=_net(seed), generator=torch.Generator().manual_seed(seed),
                evaluate=lambda clone, *, queries, **f: rows.append((queries, f)))
    return res, oracle, rows


@pytest.mark.parametrize("budget", [7, 10, 33, 80])
def test_budget_is_spent_exactly_and_counted(budget, one_thread):
    res, oracle, rows = _run(budget)
    assert oracle.queries_used == res.queries_used == budget
    assert rows[-1][0] == budget and all(q <= budget for q, _ in rows)
    sizes = res.extra["set_sizes"]
    assert sizes[-1] == budget and all(b <= 2 * a for a, b in zip(sizes, sizes[1:]))


def test_hard_labels_and_max_rounds(one_thread):
    res, oracle, _ = _run(1000, output="labels", max_rounds=2)
    assert res.queries_used == oracle.queries_used == 40  # 10 seeds, doubled twice


def test_same_seed_same_clone(one_thread):
    a, _, _ = _run(50, seed=1)
    b, _, _ = _run(50, seed=1)
    c, _, _ = _run(50, seed=2)
    sa, sb, sc = a.clone.state_dict(), b.clone.state_dict(), c.clone.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_augmentation_moves_each_pixel_by_lambda_inside_the_box():
    clone = _net(0)
    x = torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    y = torch.arange(6) % 5
    new = JBDA(lam=0.1).augment(clone, x, y, lam=0.1)
    d = (new - x).abs()
    assert new.min() >= 0 and new.max() <= 1 and torch.allclose(d[d > 0], torch.full_like(d[d > 0], 0.1), atol=1e-6)
    with pytest.raises(MisleaderError):
        JBDA(lam=0.0)
