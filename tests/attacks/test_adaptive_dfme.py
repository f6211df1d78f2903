"""Adaptive DFME attackers (issue 11): budget-exact accounting, what they change and what they leave alone."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from misleader.attacks import ATTACKS
from misleader.attacks.dfme import DFME
from misleader.attacks.dfme_filtered import FilteringDFME
from misleader.attacks.dfme_relabel import RelabelDFME, best_permutation, relabel_last_layer
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


# --------------------------------------------------------------------------- dfme-relabel

def test_random_shift_equals_the_per_image_crop():
    """The batched gather equals cropping each padded image at its drawn offset (the same draws)."""
    import torch.nn.functional as F

    x = torch.rand(9, 2, 7, 5)
    y = random_shift(x, shift=2, generator=torch.Generator().manual_seed(3))
    off = torch.randint(0, 5, (9, 2), generator=torch.Generator().manual_seed(3))
    padded = F.pad(x, (2, 2, 2, 2))
    want = torch.stack([padded[i, :, a:a + 7, b:b + 5] for i, (a, b) in enumerate(off.tolist())])
    assert torch.equal(y, want)


@given(st.integers(1, 6), st.integers(0, 10**6))
@settings(max_examples=60, deadline=None)
def test_best_permutation_is_optimal(k, seed):
    import itertools

    s = torch.rand(k, k, generator=torch.Generator().manual_seed(seed))
    sigma = best_permutation(s)
    value = lambda p: sum(float(s[a, p[a]]) for a in range(k))
    assert sorted(sigma) == list(range(k))
    assert value(sigma) == pytest.approx(max(value(p) for p in itertools.permutations(range(k))), abs=1e-9)


@pytest.mark.parametrize("budget", [32, 100, 333])
def test_relabel_spends_dfmes_queries_plus_the_real_ones(budget):
    atk = RelabelDFME(**RelabelDFME.tiny_options())
    atk.prepare(pool_x=pool(10))
    o = oracle(budget)
    res = atk.run(o, budget=budget, clone=tiny_net(1), generator=torch.Generator().manual_seed(0))
    it = (budget - 4) // atk.cost_per_iteration
    assert res.queries_used == o.queries_used == it * atk.cost_per_iteration + 4 <= budget
    assert sorted(res.extra["permutation"]) == list(range(K))
    with pytest.raises(MisleaderError, match="at least"):
        atk.run(oracle(), budget=30, clone=tiny_net(1), generator=torch.Generator())


def test_relabel_undoes_a_permuted_clone():
    """A clone that is the victim with its classes permuted (and does not train: d_iter 0) comes back as the victim."""
    victim = tiny_net(0)
    clone = tiny_net(0)
    perm = torch.tensor([2, 0, 4, 1, 3])
    with torch.no_grad():
        clone[-1].weight.copy_(victim[-1].weight[perm])
        clone[-1].bias.copy_(victim[-1].bias[perm])
    x = torch.rand(200, *SHAPE, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(clone(x), victim(x))
    atk = RelabelDFME(**{**RelabelDFME.tiny_options(), "real": 50, "d_iter": 0})
    atk.prepare(pool_x=(torch.rand(60, *SHAPE, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8))
    res = atk.run(oracle(None, victim), budget=200, clone=clone, generator=torch.Generator().manual_seed(0))
    assert res.extra["relabelled"] and res.extra["real_agreement_after"] == 1.0
    with torch.no_grad():
        assert torch.allclose(res.clone(x), victim(x), atol=1e-6)
    # against the clone that already agrees nothing is changed
    same = tiny_net(0)
    res = atk.run(oracle(None, victim), budget=200, clone=same, generator=torch.Generator().manual_seed(0))
    assert not res.extra["relabelled"] and res.extra["permutation"] == list(range(K))


def test_relabel_refuses_a_clone_whose_last_linear_is_not_the_output():
    class Tail(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_net(0)
            self.mix = torch.randn(K, K)

        def forward(self, x):
            return self.net(x) @ self.mix

    with pytest.raises(MisleaderError, match="does not make its logits"):
        relabel_last_layer(Tail(), [1, 0, 3, 4, 2], check=torch.rand(8, *SHAPE))


def test_wrapped_dfme_learns_the_targets_dataset():
    """The adaptive attacks' inner DFME resolves its preset and image map from the target, like a plain DFME."""
    meta = {"dataset": "mnist", "input_shape": [1, 28, 28], "num_classes": 10}
    for cls in (SeededDFME, FilteringDFME, RelabelDFME):
        atk = cls()
        atk.adapt_to_target(meta)
        assert atk._dfme._target["dataset"] == "mnist" and atk.dfme["preset"] == "small"


def test_best_permutation_refuses_non_finite_scores():
    with pytest.raises(ValueError, match="finite"):
        best_permutation(torch.full((3, 3), float("nan")))
