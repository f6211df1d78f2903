"""DFME: logit recovery, the zeroth-order estimator, budget accounting, determinism."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from misleader.attacks.dfme import DFME, PRESETS, estimate_gradient, recover_logits, unit_directions
from misleader.errors import MisleaderError
from misleader.oracle import ModelOracle
from _recording import RecordingOracle

torch.set_num_threads(1)

SHAPE = (1, 8, 8)  # GeneratorA needs a side divisible by 4; tiny images keep the tests fast
K = 5


def tiny_net(seed: int, k: int = K) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), 16), nn.ReLU(), nn.Linear(16, k))


def tiny_oracle(budget: int | None, *, output: str = "probs", seed: int = 0) -> ModelOracle:
    return ModelOracle(tiny_net(seed), num_classes=K, input_shape=SHAPE, output=output, budget=budget)


TINY = DFME.tiny_options()


# --------------------------------------------------------------------------- logit recovery


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    k=st.integers(2, 40),
    scale=st.floats(0.1, 30.0),
    zero_frac=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**16),
)
def test_recover_logits_with_zeros_is_finite_centred_and_exact_where_positive(rows, k, scale, zero_frac,
                                                                             seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, k, generator=g, dtype=torch.float64) * scale
    p = torch.softmax(logits, dim=1)
    # a defended / rounded API may return exact zeros: zero some entries (never a whole row)
    zero = torch.rand(rows, k, generator=g) < zero_frac
    zero[:, 0] = False
    p = torch.where(zero, torch.zeros_like(p), p).float()
    t = recover_logits(p)
    assert torch.isfinite(t).all()
    assert torch.allclose(t.double().mean(dim=1), torch.zeros(rows, dtype=torch.float64), atol=1e-3)
    # where p > 0 (and representable), t - logits is one constant per row
    pos = p > torch.finfo(torch.float32).tiny
    diff = t.double() - logits
    spread = diff.masked_fill(~pos, -math.inf).amax(1) - diff.masked_fill(~pos, math.inf).amin(1)
    has = pos.sum(1) >= 1
    assert (spread[has] < 1e-3 * (1 + scale)).all()


def test_recover_logits_without_zeros_equals_centred_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 7.0], [0.0, 0.0, 0.0, 0.0]])
    t = recover_logits(torch.softmax(logits, dim=1))
    assert torch.allclose(t, logits - logits.mean(1, keepdim=True), atol=1e-5)


class _TopKRounded(nn.Module):
    """A defended victim: softmax, keep the top ``k``, round to ``decimals``, renormalise; returned as
    log-probabilities (-inf for the zeros) so that the oracle's softmax gives back exactly those rows."""

    def __init__(self, net: nn.Module, *, k: int, decimals: int) -> None:
        super().__init__()
        self.net, self.k, self.decimals = net, k, decimals

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self.net(x).float(), dim=1)
        keep = torch.zeros_like(p, dtype=torch.bool).scatter_(1, p.topk(self.k, dim=1).indices, True)
        p = torch.round(torch.where(keep, p, torch.zeros_like(p)), decimals=self.decimals)
        p = torch.where(p.sum(1, keepdim=True) > 0, p, F.one_hot(keep.float().argmax(1), p.shape[1]).float())
        return (p / p.sum(1, keepdim=True)).log()


def test_recover_logits_floor_bounds_the_zeros_of_topk_and_rounding():
    gap = math.log(1e6)  # FLOOR_RATIO = 1e-6: a zero stands at most 13.8 nats below the row's top-1
    p = torch.tensor([[0.97, 0.03, 0.0, 0.0, 0.0],   # rounded to 2 decimals
                      [1.0, 0.0, 0.0, 0.0, 0.0],     # one-hot (top-1 rounding)
                      [0.5, 0.3, 0.2, 0.0, 0.0],     # top-3
                      [0.0, 0.0, 0.0, 0.0, 0.0]])    # degenerate all-zero row
    t = recover_logits(p)
    assert torch.isfinite(t).all()
    # the zeros' stand-in: exactly ln(1e6) below the top-1 (never the -87 of log(float32 tiny))
    for row in range(3):
        zeros = p[row] == 0
        assert torch.allclose(t[row, zeros], t[row].max() - gap, atol=1e-4)
        pos = ~zeros  # positive entries keep their exact log-ratios
        torch.testing.assert_close(t[row, pos] - t[row, 0], p[row, pos].log() - p[row, 0].log())
    assert t[1].argmax() == 0 and (t[1].max() - t[1].min()) == pytest.approx(gap, abs=1e-4)
    assert torch.equal(t[3], torch.zeros(5))
    # a row whose own smallest positive entry is tinier than the ratio keeps it as its floor (exactness)
    logits = torch.tensor([[40.0, 0.0, -10.0, 5.0]])
    q = torch.softmax(logits, dim=1)
    q[0, 3] = 0.0
    t = recover_logits(q)
    assert t[0, 3] == pytest.approx(float(t[0, 2]), abs=1e-4)  # the zero joins the smallest positive entry
    torch.testing.assert_close(t[0, :3] - t[0, 1], logits[0, :3] - logits[0, 1], atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="floor_ratio"):
        recover_logits(p, floor_ratio=0.0)


def test_dfme_against_a_topk_rounded_oracle_has_bounded_targets():
    """Against an oracle that returns exact zeros the clone's L1 target stays of the order of the logits
    (measured after one iteration: L1 6.6 here; 41.6 with the old ``log(tiny)`` floor, where every zero
    became a -87 logit)."""
    oracle = ModelOracle(_TopKRounded(tiny_net(0), k=2, decimals=2), num_classes=K, input_shape=SHAPE, budget=28)
    res = DFME(**TINY).run(oracle, budget=28, clone=tiny_net(1), generator=torch.Generator().manual_seed(0))
    assert res.queries_used == 28 and res.extra["iterations"] == 1
    assert math.isfinite(res.extra["loss_clone"]) and res.extra["loss_clone"] < 14.0


def test_authors_variant_is_centred_probabilities():
    p = torch.softmax(torch.randn(7, 10) * 5, dim=1)
    t = recover_logits(p, method="authors_log_softmax")
    assert torch.allclose(t, p - p.mean(1, keepdim=True), atol=1e-6)
    # it squashes the target into [-1, 1] where the real logits span tens of nats
    assert t.abs().max() <= 1.0
    with pytest.raises(ValueError, match="logit_recovery"):
        recover_logits(p, method="softmax")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- zeroth-order estimator


def smooth_loss(w: torch.Tensor):
    """Per-sample f(x) = sum(sin(w * x)) + 0.5 * |x|^2 / d and its analytic gradient."""

    def f(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(len(x), -1).double()
        return (torch.sin(w * flat).sum(1) + 0.5 * flat.pow(2).sum(1) / flat.shape[1]).float()

    def grad(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(len(x), -1).double()
        return (w * torch.cos(w * flat) + flat / flat.shape[1]).float().view_as(x)

    return f, grad


@pytest.mark.parametrize("shape,m", [((1, 4, 4), 1), ((1, 4, 4), 4), ((1, 32, 32), 1), ((3, 8, 8), 2)])
def test_estimate_gradient_points_along_the_true_gradient(shape, m):
    g = torch.Generator().manual_seed(1)
    n = 256
    d = math.prod(shape)
    w = torch.rand(d, generator=g, dtype=torch.float64) * 2
    f, true_grad = smooth_loss(w)
    x = torch.randn(n, *shape, generator=g)
    calls = []

    def loss_fn(points):
        calls.append(points.shape)
        return f(points)

    est, loss_at_x = estimate_gradient(loss_fn, x, m=m, epsilon=1e-3, generator=g)
    assert calls == [(n * (m + 1), *shape)]  # one batched call with all probes
    assert est.shape == x.shape and torch.allclose(loss_at_x, f(x))
    cos = F.cosine_similarity(est.reshape(n, -1), true_grad(x).reshape(n, -1), dim=1)
    # forward differences along unit directions: E|cos| ~ sqrt(2 m / (pi d)), and cos >= 0 up to O(eps)
    expected = min(1.0, math.sqrt(2 * m / (math.pi * d)))
    assert cos.mean() > 0.5 * expected
    assert (cos > -0.05).all()


def test_estimate_gradient_is_unbiased_with_many_directions():
    g = torch.Generator().manual_seed(2)
    shape, n = (1, 4, 4), 8
    w = torch.rand(16, generator=g, dtype=torch.float64) * 2
    f, true_grad = smooth_loss(w)
    x = torch.randn(n, *shape, generator=g)
    est, _ = estimate_gradient(f, x, m=20_000, epsilon=1e-3, generator=g)
    tg = true_grad(x).reshape(n, -1)
    cos = F.cosine_similarity(est.reshape(n, -1), tg, dim=1)
    assert cos.min() > 0.95
    ratio = est.reshape(n, -1).norm(dim=1) / tg.norm(dim=1)
    assert ((ratio > 0.85) & (ratio < 1.15)).all()  # the d / epsilon scale is right


def test_estimate_gradient_of_a_linear_function_is_exact_in_expectation_and_validates():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(1, 2, 3, 3, generator=g)
    x = torch.randn(4, 2, 3, 3, generator=g)
    est, _ = estimate_gradient(lambda p: (p * a).flatten(1).sum(1), x, m=30_000, epsilon=0.5, generator=g)
    assert torch.allclose(est, a.expand_as(x), atol=0.1)
    with pytest.raises(ValueError):
        estimate_gradient(lambda p: p.sum(), x, m=1, epsilon=1e-3, generator=g)  # wrong loss shape
    with pytest.raises(ValueError):
        estimate_gradient(lambda p: p.flatten(1).sum(1), x, m=0, epsilon=1e-3, generator=g)
    with pytest.raises(ValueError):
        estimate_gradient(lambda p: p.flatten(1).sum(1), x, m=1, epsilon=0.0, generator=g)


def test_unit_directions_have_unit_norm():
    u = unit_directions(5, 3, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    assert u.shape == (5, 3, 2, 4, 4)
    assert torch.allclose(u.flatten(2).norm(dim=2), torch.ones(5, 3), atol=1e-5)


# --------------------------------------------------------------------------- the attack


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_configures_the_attack_as_its_dataclass(name):
    a = DFME(preset=name)
    cfg = PRESETS[name]
    assert a.config() == {"preset": name, **asdict(cfg)}
    # queries per iteration: a clone batch per d_iter and (grad_m + 1) probe batches per g_iter
    assert a.cost_per_iteration == cfg.batch_size * (cfg.g_iter * (cfg.grad_m + 1) + cfg.d_iter)
    assert a.iterations_for(5 * a.cost_per_iteration - 1) == 4


def test_overrides_are_applied_and_type_checked():
    a = DFME(preset="paper", batch_size=8.0, logit_recovery="authors_log_softmax", grad_m=2)
    assert a.config() == {**asdict(PRESETS["paper"]), "preset": "paper", "batch_size": 8, "grad_m": 2,
                          "logit_recovery": "authors_log_softmax"}
    assert a.cost_per_iteration == 8 * (PRESETS["paper"].g_iter * 3 + PRESETS["paper"].d_iter)
    with pytest.raises(MisleaderError, match="batch_size must be an integer"):
        DFME(batch_size="big")
    with pytest.raises(MisleaderError, match="preset"):
        DFME(preset="gpu-huge")
    with pytest.raises(MisleaderError, match="unknown dfme option"):
        DFME(grad_mm=2)
    with pytest.raises(MisleaderError, match="logit_recovery"):
        DFME(logit_recovery="softmax")


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 5),
    m=st.integers(1, 3),
    g_iter=st.integers(1, 2),
    d_iter=st.integers(0, 3),
    budget=st.integers(1, 300),
)
def test_budget_exactness(batch, m, g_iter, d_iter, budget):
    attack = DFME(**{**TINY, "batch_size": batch}, grad_m=m, g_iter=g_iter, d_iter=d_iter)
    cost = batch * (g_iter * (m + 1) + d_iter)
    assert attack.cost_per_iteration == cost
    oracle = tiny_oracle(budget)  # the oracle itself refuses anything beyond the budget
    if budget < cost:
        with pytest.raises(MisleaderError, match="at least"):
            attack.run(oracle, budget=budget, clone=tiny_net(1), generator=torch.Generator().manual_seed(0))
        assert oracle.queries_used == 0
        return
    res = attack.run(oracle, budget=budget, clone=tiny_net(1), generator=torch.Generator().manual_seed(0))
    iterations = budget // cost
    assert res.queries_used == oracle.queries_used == cost * iterations <= budget
    assert res.extra["iterations"] == iterations
    assert res.extra["unused_queries"] == budget - cost * iterations < cost


def test_needs_a_probability_oracle():
    with pytest.raises(ValueError, match="probs"):
        DFME(**TINY).run(tiny_oracle(1000, output="labels"), budget=1000, clone=tiny_net(1),
                         generator=torch.Generator())


def _run(seed: int, **kw):
    oracle = tiny_oracle(600)
    res = DFME(**TINY, **kw).run(oracle, budget=600, clone=tiny_net(1),
                                 generator=torch.Generator().manual_seed(seed))
    return res.clone.state_dict()


def test_same_seed_same_clone_and_other_seed_differs():
    a, b, c = _run(0), _run(0), _run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    d = _run(0, logit_recovery="authors_log_softmax")
    assert any(not torch.equal(a[k], d[k]) for k in a)


def test_evaluate_callback_is_log_only_and_called_on_schedule():
    calls = []

    def evaluate(clone, *, queries, **fields):
        calls.append((clone.training, queries, sorted(fields)))
        return {"clone_accuracy": 0.5}  # ignored: an attack learns nothing from it

    attack = DFME(**TINY)  # 28 queries per iteration
    res = attack.run(tiny_oracle(1000), budget=1000, clone=tiny_net(1),
                     generator=torch.Generator().manual_seed(0), evaluate=evaluate, eval_every=200)
    qs = [q for _, q, _ in calls]
    assert qs == sorted(qs) and qs[-1] == res.queries_used == 35 * 28
    assert len(qs) >= 4 and all(f == ["heldout_agreement", "iteration", "loss_clone", "loss_generator"] for *_, f in calls)
    assert all("clone_accuracy" not in r for r in res.history)
    plain = DFME(**TINY).run(tiny_oracle(1000), budget=1000, clone=tiny_net(1),
                             generator=torch.Generator().manual_seed(0))
    sd, sd2 = res.clone.state_dict(), plain.clone.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_clone_learns_the_victim():
    """End to end on a tiny linear victim: fidelity on random images rises well above chance."""
    torch.manual_seed(0)
    victim = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with torch.no_grad():
        victim[1].weight.mul_(8)
    oracle = ModelOracle(victim, num_classes=3, input_shape=SHAPE, budget=15_000)
    torch.manual_seed(1)
    clone = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    x = torch.rand(2000, *SHAPE)

    def agree() -> float:
        with torch.no_grad():
            return float((clone(x).argmax(1) == victim(x).argmax(1)).float().mean())

    before = agree()
    res = DFME(preset="cpu", batch_size=32, nz=16, ngf=8).run(
        oracle, budget=15_000, clone=clone, generator=torch.Generator().manual_seed(0))
    after = agree()
    assert res.queries_used == 15_000 // 224 * 224
    assert before < 0.4 and after > 0.55  # measured: 0.21 -> 0.74


@pytest.mark.parametrize("center,scale", [(0.5, 0.5), (0.1, 0.275)])
def test_image_space_of_the_queries(center, scale):
    oracle = RecordingOracle(tiny_net(0), num_classes=K, input_shape=SHAPE, budget=300)
    DFME(**TINY, image_center=center, image_scale=scale).run(oracle, budget=300, clone=tiny_net(1),
                                                             generator=torch.Generator().manual_seed(0))
    x = torch.cat(oracle.inputs)
    assert len(x) == oracle.queries_used
    lo, hi = max(0.0, center - scale), min(1.0, center + scale)
    assert x.min() >= lo - 1e-6 and x.max() <= hi + 1e-6
    # GeneratorA's final BatchNorm(affine=False) centres the pre-tanh image: queries average near the centre
    assert abs(float(x.mean()) - center) < 0.1
    with pytest.raises(MisleaderError, match="image_scale"):
        DFME(image_scale=0.0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_upsample_conv3x3_is_upsample_then_conv_with_the_same_gradients(bias, channels_last):
    from misleader.models.generators import upsample_conv3x3

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
    x = torch.randn(2, 3, 5, 6)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    ref = conv(F.interpolate(x, scale_factor=2))
    out = upsample_conv3x3(x, conv)
    assert out.shape == ref.shape == (2, 4, 10, 12)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(ref)  # a loss that weights every output pixel differently
    g_ref = torch.autograd.grad((ref * w).sum(), [x, *conv.parameters()])
    g_new = torch.autograd.grad((out * w).sum(), [x, *conv.parameters()])
    for a, b in zip(g_ref, g_new):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="3x3"):
        upsample_conv3x3(x, nn.Conv2d(3, 4, 3, padding=1, stride=2))


def test_generator_fast_upsample_is_the_same_function():
    from misleader.models.generators import GeneratorA

    torch.manual_seed(0)  # float64: the same function up to rounding (float32 rounding differs by ~1e-6)
    plain = GeneratorA(nz=8, ngf=4, img_size=12, nc=2).double().train()
    fast = GeneratorA(nz=8, ngf=4, img_size=12, nc=2, fast_upsample=True).double().train()
    fast.load_state_dict(plain.state_dict())
    z = torch.randn(6, 8, dtype=torch.float64)
    a, b = plain(z, pre_x=True), fast(z, pre_x=True)
    torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(fast(z), plain(z), atol=1e-10, rtol=1e-10)
    ga = torch.autograd.grad(a.square().sum(), list(plain.parameters()))
    gb = torch.autograd.grad(b.square().sum(), list(fast.parameters()))
    for (name, _), x, y in zip(plain.named_parameters(), ga, gb):
        torch.testing.assert_close(y, x, atol=1e-10, rtol=1e-8, msg=name)


def test_cpu_bf16_option_runs_deterministically_and_changes_the_run():
    a, b = _run(0, cpu_bf16=True), _run(0, cpu_bf16=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = _run(0, cpu_bf16=False)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert all(v.dtype == c[k].dtype and torch.isfinite(v).all() for k, v in a.items())


def test_cpu_bf16_default_follows_the_cpu_and_is_recorded():
    from misleader.attacks.dfme import cpu_has_bf16

    auto = _run(0)
    forced = _run(0, cpu_bf16=cpu_has_bf16())
    assert all(torch.equal(auto[k], forced[k]) for k in auto)
    res = DFME(**TINY).run(tiny_oracle(600), budget=600, clone=tiny_net(1), generator=torch.Generator().manual_seed(0))
    assert res.extra["cpu_bf16"] is cpu_has_bf16()
    res = DFME(**TINY, cpu_bf16=False).run(tiny_oracle(600), budget=600, clone=tiny_net(1),
                                           generator=torch.Generator().manual_seed(0))
    assert res.extra["cpu_bf16"] is False
