"""MAD: the batched closed form equals the per-example autograd-Jacobian reference (all four oracle/objective
combinations), and its speed-ups (chunks, channels-last surrogate) leave the answer unchanged."""

from __future__ import annotations

import pytest
import torch
from _output_ctx import random_probs, random_x, tiny_net

from misleader.defenses.mad import (jacobian_last_layer, mad_batched, mad_reference, prepare_surrogate,
                                    surrogate_features, top_first)
from misleader.models import create_model


def _both(k: int, n: int, *, oracle: str, objective: str, epsilon: float, max_evals: int = 1024):
    model = tiny_net(3, k=k)
    x, y = random_x(n, seed=1).double(), random_probs(n, k=k, seed=2).double()
    with torch.no_grad():
        p_s, h = surrogate_features(model, x)
    fast = mad_batched(y, p_s, h, epsilon=epsilon, oracle=oracle, objective=objective, max_evals=max_evals)
    slow = mad_reference(model, x, y, epsilon=epsilon, oracle=oracle, objective=objective, max_evals=max_evals)
    return y, fast, slow


@pytest.mark.parametrize("oracle", ["extreme", "argmax"])
@pytest.mark.parametrize("objective", ["angular", "plain"])
def test_batched_equals_reference(oracle: str, objective: str) -> None:
    y, fast, slow = _both(10, 24, oracle=oracle, objective=objective, epsilon=0.7)
    assert (fast - slow).abs().max() < 1e-5
    l1 = (fast - y).abs().sum(dim=1)
    assert torch.all(l1 <= 0.7 + 1e-6)  # float32 input rows are renormalised in float64 (~1e-7)
    assert torch.allclose(fast.sum(dim=1), torch.ones(len(y), dtype=fast.dtype)) and fast.min() >= 0
    if oracle == "argmax":
        assert torch.equal(fast.argmax(dim=1), y.argmax(dim=1))


def test_greedy_oracle_above_ten_classes_equals_reference() -> None:
    y, fast, slow = _both(13, 6, oracle="argmax", objective="angular", epsilon=0.5, max_evals=200)
    assert (fast - slow).abs().max() < 1e-5
    assert torch.equal(fast.argmax(dim=1), y.argmax(dim=1))


def test_line_search_spends_the_whole_budget_when_the_target_is_far() -> None:
    y, fast, _ = _both(10, 8, oracle="extreme", objective="angular", epsilon=0.3)
    l1 = (fast - y).abs().sum(dim=1)
    assert torch.allclose(l1, torch.full_like(l1, 0.3), atol=1e-6)  # one-hot targets are > 0.3 away here


def test_plain_extreme_objective_picks_the_least_likely_class() -> None:
    """With ``plain``, ||G^T (e_k - y)||^2 = ||e_k - y||^2 ||h||^2: the extreme oracle picks argmin y (note 1b)."""
    y, fast, _ = _both(10, 16, oracle="extreme", objective="plain", epsilon=2.0)
    assert torch.equal(fast.argmax(dim=1), y.argmin(dim=1))


@pytest.mark.parametrize("objective", ["angular", "plain"])
def test_batched_equals_reference_on_confident_answers(objective: str) -> None:
    """Peaked answers (non-top classes ~1e-9 apart) are where a sloppy objective would pick another class."""
    model = tiny_net(5)
    x, y = random_x(16, seed=4).double(), random_probs(16, seed=6, temperature=12.0).double()
    with torch.no_grad():
        p_s, h = surrogate_features(model, x)
    for oracle in ("extreme", "argmax"):
        fast = mad_batched(y, p_s, h, epsilon=0.5, oracle=oracle, objective=objective)
        slow = mad_reference(model, x, y, epsilon=0.5, oracle=oracle, objective=objective)
        assert (fast - slow).abs().max() < 1e-5


def test_autograd_jacobian_is_the_closed_form() -> None:
    """Row k of the reference's Jacobian is (p_s - e_k) (x) h (note 1b): the identity the batched path rests on."""
    model = tiny_net(7)
    x = random_x(3, seed=8).double()
    with torch.no_grad():
        p_s, h = surrogate_features(model, x)
    for i in range(len(x)):
        g = jacobian_last_layer(model, x[i : i + 1])
        closed = (p_s[i][None] - torch.eye(10, dtype=torch.float64))[:, :, None] * h[i][None, None]  # (K, K, F)
        assert torch.allclose(g, closed.flatten(1), atol=1e-12)


def test_chunks_and_channels_last_do_not_change_the_answer() -> None:
    torch.manual_seed(0)
    model = create_model("lenet5", in_channels=1, num_classes=10).eval()
    x, y = torch.rand(7, 1, 32, 32), random_probs(7, seed=3)
    with torch.no_grad():
        p_s, h = surrogate_features(model, x)
        prepare_surrogate(model)
        assert model.net.features[0].weight.is_contiguous(memory_format=torch.channels_last)
        p_c, h_c = surrogate_features(model, x, chunk=3)
    assert torch.allclose(p_s, p_c, atol=1e-6) and torch.allclose(h, h_c, atol=1e-5)
    for oracle in ("extreme", "argmax"):
        whole = mad_batched(y, p_s, h, epsilon=0.5, oracle=oracle, objective="angular", chunk=7)
        assert torch.equal(whole, mad_batched(y, p_s, h, epsilon=0.5, oracle=oracle, objective="angular", chunk=2))


def test_top_first_puts_the_argmax_first_then_the_rest_in_order() -> None:
    y = random_probs(50, seed=9)
    perm = top_first(y)
    for row, p in zip(y, perm.tolist()):
        top = int(row.argmax())
        assert p == [top, *[j for j in range(10) if j != top]]
