"""DFMS-HL: hard labels only, budget accounting, diversity loss, proxy handling, determinism."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from misleader.attacks.dfms_hl import CIFAR100_40_CLASSES, DFMSHL, PRESETS, diversity_loss
from misleader.errors import MisleaderError
from misleader.oracle import ModelOracle

torch.set_num_threads(1)

SHAPE = (1, 32, 32)  # the DCGAN makes 32x32 images
K = 4
#: the smallest useful configuration: a 4-wide DCGAN, one GAN epoch, a few pre-training images
TINY = DFMSHL.tiny_options()


def tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(64, K))


class SpyOracle(ModelOracle):
    """Records every answer it gives, to check the attack only ever receives labels."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.answers: list[torch.Tensor] = []

    def query(self, x: torch.Tensor) -> torch.Tensor:
        out = super().query(x)
        self.answers.append(out)
        return out


def oracle(budget: int | None, *, output: str = "labels") -> SpyOracle:
    return SpyOracle(tiny_net(0), num_classes=K, input_shape=SHAPE, output=output, budget=budget)


def pool(n: int = 64, *, seed: int = 5, labels: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8)
    return x, (torch.arange(n) % 10 if labels else None)


def attack(**kw) -> DFMSHL:
    a = DFMSHL(**{**TINY, **kw})
    x, y = pool(labels=True)
    a.prepare(pool_x=x, pool_y=y)
    return a


# --------------------------------------------------------------------------- diversity loss


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 32), k=st.integers(2, 20), scale=st.floats(0.0, 50.0), seed=st.integers(0, 2**16))
def test_diversity_loss_is_bounded_by_the_uniform_and_the_collapsed_batch(n, k, scale, seed):
    logits = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale
    v = float(diversity_loss(logits))
    assert math.isfinite(v)
    assert -math.log(k) - 1e-4 <= v <= 1e-4  # entropy of the batch mean lies in [0, log K]


def test_diversity_loss_prefers_balanced_batches():
    k = 5
    balanced = torch.eye(k).repeat(4, 1) * 30  # every class equally often, confidently
    collapsed = torch.zeros(20, k)
    collapsed[:, 2] = 30
    assert float(diversity_loss(balanced)) == pytest.approx(-math.log(k), abs=1e-3)
    assert float(diversity_loss(collapsed)) == pytest.approx(0.0, abs=1e-3)
    logits = torch.zeros(20, k)
    logits[:, 0] = 3.0
    logits.requires_grad_(True)
    diversity_loss(logits).backward()
    assert logits.grad[:, 0].mean() > 0  # descending pushes the over-represented class down


# --------------------------------------------------------------------------- the attack


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_configures_the_attack_as_its_dataclass(name):
    a = DFMSHL(preset=name)
    assert a.config() == {"preset": name, **asdict(PRESETS[name])}
    assert a._cfg == PRESETS[name]


def test_overrides_are_applied_on_top_of_the_preset_and_type_checked():
    a = DFMSHL(preset="cpu", batch_size=16.0, gan_lr=1, ema_taus=[0.5, 0.25], proxy_classes=[3, 1], flip=True)
    cfg = a.config()
    assert cfg == {**asdict(PRESETS["cpu"]), "preset": "cpu", "batch_size": 16, "gan_lr": 1.0,
                   "ema_taus": (0.5, 0.25), "proxy_classes": (3, 1), "flip": True}
    assert type(cfg["batch_size"]) is int and type(cfg["gan_lr"]) is float
    # the shared preset is not mutated by an override
    assert DFMSHL(preset="paper").config()["batch_size"] == PRESETS["paper"].batch_size
    bads = [({"batch_size": "abc"}, "batch_size must be an integer"), ({"batch_size": 2.5}, "integer"),
            ({"flip": 1}, "flip must be true or false"),
            ({"gan_lr": float("nan")}, "gan_lr must be a number"),
            ({"ema_taus": "x"}, "ema_taus"), ({"batch_size": 0}, "batch_size must be > 0"),
            ({"gan_beta1": 1.0}, r"gan_beta1 must be in \[0, 1\)"), ({"ema_taus": [1.5]}, "ema_taus"),
            ({"d_l": 3}, "unknown dfms-hl option")]
    for bad, match in bads:
        with pytest.raises(MisleaderError, match=match):
            DFMSHL(preset="cpu", **bad)
    with pytest.raises(MisleaderError, match="preset"):
        DFMSHL(preset="tpu")


def test_auto_preset_follows_the_target_and_keeps_the_overrides():
    a = DFMSHL(batch_size=16)
    a.adapt_to_target({"dataset": "mnist", "input_shape": [1, 28, 28], "num_classes": 10})
    assert a.preset == "small"
    assert a.config() == {**asdict(PRESETS["small"]), "preset": "small", "batch_size": 16}
    a.adapt_to_target({"dataset": "cifar10", "input_shape": [3, 32, 32], "num_classes": 10})
    assert a.preset == "paper"
    assert a.config() == {**asdict(PRESETS["paper"]), "preset": "paper", "batch_size": 16}
    fixed = DFMSHL(preset="cpu")
    fixed.adapt_to_target({"dataset": "cifar10", "input_shape": [3, 32, 32], "num_classes": 10})
    assert fixed.preset == "cpu"  # an explicit preset is never re-chosen


def test_default_pool_is_another_dataset_and_hard_labels_only():
    assert DFMSHL.requires == frozenset({"labels"}) and DFMSHL.needs_pool
    assert DFMSHL.choose_pool({"dataset": "mnist"}) == "fashion-mnist"
    with pytest.raises(MisleaderError, match="--pool"):
        DFMSHL.choose_pool({"dataset": "npz:/x.npz"})
    assert len(set(CIFAR100_40_CLASSES)) == 40 and all(0 <= c < 100 for c in CIFAR100_40_CLASSES)


def test_works_with_a_labels_oracle_and_only_sees_labels():
    o = oracle(400)
    res = attack().run(o, budget=400, clone=tiny_net(1), generator=torch.Generator().manual_seed(0))
    assert o.answers and all(a.dtype == torch.int64 and a.dim() == 1 for a in o.answers)
    assert res.queries_used == o.queries_used == sum(len(a) for a in o.answers)
    with pytest.raises(ValueError, match="labels"):
        attack().run(oracle(400, output="probs"), budget=400, clone=tiny_net(1), generator=torch.Generator())


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(2, 9), pre_proxy=st.integers(0, 40), pre_fake=st.integers(0, 20),
       budget=st.integers(1, 200))
def test_budget_exactness(batch, pre_proxy, pre_fake, budget):
    a = attack(batch_size=batch, pretrain_proxy=pre_proxy, pretrain_fake=pre_fake)
    o = oracle(budget)  # refuses anything beyond the budget
    pre = 8 + min(pre_proxy, 32) + pre_fake  # 8 validation images; proxy_size 32 caps the labelled proxy
    assert a.pretrain_queries(64) == pre
    if budget - pre < batch:
        with pytest.raises(MisleaderError, match="budget"):
            a.run(o, budget=budget, clone=tiny_net(1), generator=torch.Generator().manual_seed(0))
        assert o.queries_used == 0
        return
    res = a.run(o, budget=budget, clone=tiny_net(1), generator=torch.Generator().manual_seed(0))
    iterations = (budget - pre) // batch
    assert res.queries_used == o.queries_used == pre + batch * iterations <= budget
    assert res.extra["pretrain_queries"] == pre and res.extra["iterations"] == iterations
    assert res.extra["unused_queries"] < batch


def test_needs_a_pool():
    with pytest.raises(MisleaderError, match="pool"):
        DFMSHL(**TINY).run(oracle(400), budget=400, clone=tiny_net(1), generator=torch.Generator())


def test_proxy_classes_filter_the_pool():
    a = attack(proxy_classes=[1, 3], proxy_size=None, pretrain_proxy=0, pretrain_fake=0, val_size=0)
    res = a.run(oracle(100), budget=100, clone=tiny_net(1), generator=torch.Generator().manual_seed(0))
    assert res.extra["proxy_images"] == 14  # pool labels arange(64) % 10 in {1, 3}: 7 + 7
    b = DFMSHL(**{**TINY, "proxy_classes": (1,)})
    b.prepare(pool_x=pool()[0])
    with pytest.raises(MisleaderError, match="labels"):
        b.run(oracle(100), budget=100, clone=tiny_net(1), generator=torch.Generator())


def _run(seed: int, **kw):
    res = attack(**kw).run(oracle(300), budget=300, clone=tiny_net(1),
                           generator=torch.Generator().manual_seed(seed))
    return res.clone.state_dict()


def test_same_seed_same_clone_and_other_seed_differs():
    a, b, c = _run(0), _run(0), _run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_history_and_evaluate_never_steer_the_attack():
    rows = []

    def evaluate(clone, *, queries, **fields):
        rows.append({"queries": queries, **fields})
        return {"clone_accuracy": 0.1}  # ignored

    res = attack().run(oracle(400), budget=400, clone=tiny_net(1), generator=torch.Generator().manual_seed(0),
                       evaluate=evaluate, eval_every=100)
    assert rows[0]["stage"] == "pretrain" and rows[0]["queries"] == 32
    assert rows[-1]["queries"] == res.queries_used
    qs = [r["queries"] for r in rows]
    assert qs == sorted(qs) and len(qs) >= 4
    plain = attack().run(oracle(400), budget=400, clone=tiny_net(1),
                         generator=torch.Generator().manual_seed(0))
    sd, sd2 = res.clone.state_dict(), plain.clone.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_cifar100_proxy_classes_match_the_class_names(shared_data):
    try:
        from misleader.data import load_dataset

        names = load_dataset("cifar100", data_dir=shared_data).class_names
    except MisleaderError:
        pytest.skip("CIFAR-100 is not in the shared data folder")
    wanted = {"orchid", "poppy", "rose", "sunflower", "tulip", "bottle", "bowl", "can", "cup", "plate",
              "apple", "mushroom", "orange", "pear", "sweet_pepper", "clock", "keyboard", "lamp",
              "telephone", "television", "bed", "chair", "couch", "table", "wardrobe", "maple_tree",
              "oak_tree", "palm_tree", "pine_tree", "willow_tree", "bridge", "castle", "house", "road",
              "skyscraper", "cloud", "forest", "mountain", "plain", "sea"}
    assert {names[i] for i in CIFAR100_40_CLASSES} == wanted


def test_selector_keeps_the_best_weights_on_the_validation_set():
    from misleader.attacks.dfms_hl import _Selector

    torch.manual_seed(0)
    clone = nn.Sequential(nn.Flatten(), nn.Linear(2, 3))
    with torch.no_grad():
        clone[1].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        clone[1].bias.zero_()
    x = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0], [2.0, 0.0]]).view(4, 1, 1, 2)
    y = torch.tensor([0, 1, 2, 0])
    sel = _Selector(clone, x, y, taus=(0.5,), num_classes=3)
    sel.consider("good", 0)
    assert sel.best_score == pytest.approx(1.0)
    good = clone[1].weight.detach().clone()
    with torch.no_grad():
        clone[1].weight.zero_()
        clone[1].bias.copy_(torch.tensor([0.0, 0.0, 1.0]))  # predicts class 2 everywhere
    sel.update_ema()  # ema = 0.5 * good + 0.5 * bad
    sel.consider("bad", 1)
    assert sel.best_name == "good"
    out = sel.load_best()
    assert out == {"selected": "good", "selected_iteration": 0, "val_balanced_accuracy": pytest.approx(1.0)}
    assert torch.equal(clone[1].weight, good)


def test_selector_scores_class_balanced_accuracy():
    from misleader.attacks.dfms_hl import _Selector

    clone = nn.Sequential(nn.Flatten(), nn.Linear(1, 3))
    with torch.no_grad():
        clone[1].weight.zero_()
        clone[1].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))  # always class 0
    y = torch.tensor([0] * 8 + [1] * 2)  # class 2 absent: the score averages over classes 0 and 1
    sel = _Selector(clone, torch.zeros(10, 1, 1, 1), y, taus=(), num_classes=3)
    sel.consider("c", 0)
    assert sel.best_score == pytest.approx(0.5)  # plain accuracy would be 0.8


def test_returned_clone_is_the_selected_candidate_not_the_final_one(monkeypatch):
    """With scores that only the pretrained clone wins, the attack must return the pretrained weights, which
    training then moved away from (fails if the selector kept a score but returned the final clone)."""
    from misleader.attacks import dfms_hl

    snaps: dict[str, dict[str, torch.Tensor]] = {}
    consider, calls = dfms_hl._Selector.consider, []

    def score(self, tensors):  # the first candidate scored (the pretrained clone) is the best
        calls.append(1)
        return 1.0 if len(calls) == 1 else 0.0

    def spy_consider(self, name, iteration):
        snaps[name] = {k: v.detach().clone() for k, v in self.clone.state_dict().items()}
        consider(self, name, iteration)

    monkeypatch.setattr(dfms_hl._Selector, "_score", score)
    monkeypatch.setattr(dfms_hl._Selector, "consider", spy_consider)
    res = attack(val_size=16).run(oracle(400), budget=400, clone=tiny_net(1), generator=torch.Generator().manual_seed(0))
    assert res.extra["selected"]["selected"] == "pretrained" and res.extra["val_queries"] == 16
    final, pre, out = snaps["clone"], snaps["pretrained"], res.clone.state_dict()
    assert any(not torch.equal(final[k], pre[k]) for k in pre)  # stage 4 changed the weights
    assert all(torch.equal(out[k], pre[k]) for k in pre)  # ... and the pretrained ones came back
