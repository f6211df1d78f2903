"""Adaptive DFME attackers (issue 11): budget-exact accounting, what they change and what they leave alone."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from misleader.attacks import ATTACKS
from misleader.attacks.dfme import DFME
from misleader.attacks.dfme_filtered import FilteringDFME
from misleader.attacks.dfme_seeded import SeededDFME, random_shift
from misleader.errors import MisleaderError
from misleader.oracle import ModelOracle

torch.set_num_threads(1)
SHAPE, K = (1, 8, 8), 5


def tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), 16), nn.ReLU(), nn.Linear(16, K))


class Recording(nn.Module):
    """A victim that records every batch it answers."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.seen = tiny_net(0), []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.net(x)


def oracle(budget=None, model=None):
    return ModelOracle(model or tiny_net(0), num_classes=K, input_shape=SHAPE, output="probs", budget=budget)


def pool(n=20, value=255):
    return torch.full((n, *SHAPE), value, dtype=torch.uint8)


def test_registered():
    assert "dfme-seeded" in ATTACKS and "dfme-filtered" in ATTACKS


@pytest.mark.parametrize("budget", [28, 100, 301])
def test_seeded_spends_exactly_dfmes_queries_and_mixes_real_images(budget):
    rec = Recording()
    o = oracle(budget, rec)
    atk = SeededDFME(**{**SeededDFME.tiny_options(), "mix": 0.5, "shift": 0})
    atk.prepare(pool_x=pool())
    res = atk.run(o, budget=budget, clone=tiny_net(1), generator=torch.Generator().manual_seed(0))
    it = DFME(**DFME.tiny_options()).iterations_for(budget)
    assert res.queries_used == o.queries_used == it * atk.cost_per_iteration <= budget
    # real (all-ones) images appear only in clone-training batches: 5 per iteration, 2 rows each
    ones = sum(int((b == 1).flatten(1).all(1).sum()) for b in rec.seen)
    assert ones == res.extra["real_queries"] == it * 5 * 2
    assert isinstance(res.clone, nn.Sequential)


def test_seeded_clone_trains_on_the_mixed_images():
    """With mix = 1 the clone sees only the real image: it must learn the victim's answer on it."""
    victim = tiny_net(0)
    o = oracle(None, victim)
    atk = SeededDFME(**{**SeededDFME.tiny_options(), "mix": 1.0, "shift": 0, "seeds": 1})
    atk.prepare(pool_x=pool(1))
    clone = tiny_net(1)
    x1 = torch.ones(1, *SHAPE)
    before = (clone(x1) - clone(x1).mean() - (victim(x1) - victim(x1).mean())).abs().mean().item()
    atk.run(o, budget=28 * 30, clone=clone, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        after = (clone(x1) - clone(x1).mean() - (victim(x1) - victim(x1).mean())).abs().mean().item()
    assert after < before


def test_random_shift_moves_content_within_bounds():
    x = torch.zeros(3, 1, 8, 8)
    x[:, :, 4, 4] = 1
    y = random_shift(x, shift=2, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.equal(y.sum((1, 2, 3)), torch.ones(3))
    assert torch.equal(random_shift(x, shift=0, generator=torch.Generator()), x)


@pytest.mark.parametrize("budget", [40, 100, 333])
def test_filtered_pays_for_its_checks_and_stays_within_budget(budget):
    o = oracle(budget)
    atk = FilteringDFME(**FilteringDFME.tiny_options())
    assert atk.cost_per_iteration == 4 * (2 + 5 * 2)
    it = budget // atk.cost_per_iteration
    if it == 0:
        with pytest.raises(MisleaderError, match="at least"):
            atk.run(o, budget=budget, clone=tiny_net(1), generator=torch.Generator().manual_seed(0))
        return
    res = atk.run(o, budget=budget, clone=tiny_net(1), generator=torch.Generator().manual_seed(0))
    assert res.queries_used == o.queries_used == it * atk.cost_per_iteration <= budget
    assert 0.0 <= res.extra["kept_fraction"] <= 1.0


class Flipper(nn.Module):
    """Answers depend on the sign of a pixel sum that the attacker's noise flips at random."""

    def forward(self, x):
        s = (x - 0.5).flatten(1).sum(1, keepdim=True) * 1e4
        return torch.cat([s, -s, torch.zeros(len(x), K - 2)], 1)


def test_filtered_drops_inconsistent_answers():
    """Against an oracle whose top-1 flips under noise about half of the rows are dropped; a constant oracle keeps all."""
    res = FilteringDFME(**{**FilteringDFME.tiny_options(), "sigma": 0.5}).run(
        oracle(None, Flipper()), budget=48 * 20, clone=tiny_net(1), generator=torch.Generator().manual_seed(0))
    assert res.extra["kept_fraction"] < 0.9

    class Const(nn.Module):
        def forward(self, x):
            return torch.tensor([[5.0, 0, 0, 0, 0]]).expand(len(x), K)

    res = FilteringDFME(**FilteringDFME.tiny_options()).run(
        oracle(None, Const()), budget=48 * 5, clone=tiny_net(1), generator=torch.Generator().manual_seed(0))
    assert res.extra["kept_fraction"] == 1.0


def test_bad_options_are_one_line_errors():
    with pytest.raises(MisleaderError):
        SeededDFME(seeds=0)
    with pytest.raises(MisleaderError):
        FilteringDFME(checks=0)
    atk = SeededDFME(**{**SeededDFME.tiny_options(), "seeds": 50})
    atk.prepare(pool_x=pool(10))
    with pytest.raises(MisleaderError, match="fewer than seeds"):
        atk.run(oracle(), budget=100, clone=tiny_net(1), generator=torch.Generator())
