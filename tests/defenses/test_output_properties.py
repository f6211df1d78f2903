"""Property tests: every output step answers on the simplex and honours its declared L1 bound and argmax."""

from __future__ import annotations

import pytest
import torch
from _output_ctx import K, build_step, random_x
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

STEPS = [("randp", {"epsilon": 0.3}), ("randp", {"epsilon": 2.0}),
         ("randp", {"epsilon": 1.0, "form": "logit"}), ("randp", {"epsilon": 3.0, "form": "logit", "dist": "l2"}),
         ("mad", {"epsilon": 0.5, "oracle": "argmax", "surrogate": "s"}),
         ("mad", {"epsilon": 1.5, "oracle": "extreme", "objective": "plain", "surrogate": "s"}),
         ("mad", {"epsilon": 0.1, "oracle": "argmax", "objective": "plain", "surrogate": "s"}),
         ("grad2", {"epsilon": 0.5, "surrogates": ["a"]}), ("grad2", {"epsilon": 2.0, "target": "min_ip", "surrogates": ["a"]}),
         ("reverse_sigmoid", {"beta": 1.0, "gamma": 0.1}), ("reverse_sigmoid", {"beta": 0.3, "gamma": 2.0}),
         ("round", {"decimals": 1}), ("round", {"decimals": 3}), ("top_k", {"k": 1}), ("top_k", {"k": 3, "cutoff": 0.2}),
         ("labels", {}), ("gaussian", {"scale": 0.2}), ("gaussian", {"scale": 5.0}),
         ("adaptive_misinfo", {"tau": 0.7, "nu": 30.0, "misinfo": "m", "detector": "d"})]

_random_row = st.lists(st.one_of(st.just(0.0), st.floats(0.0, 1.0)), min_size=K, max_size=K).filter(lambda r: sum(r) > 1e-3)
_one_hot = st.integers(0, K - 1).map(lambda i: [float(j == i) for j in range(K)])
_uniform = st.just([1.0] * K)
_rows = st.lists(st.one_of(_random_row, _one_hot, _uniform), min_size=1, max_size=6)


def _probs(rows: list[list[float]]) -> torch.Tensor:
    y = torch.tensor(rows, dtype=torch.float32)
    return y / y.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("type_name,spec", STEPS, ids=[f"{t}-{i}" for i, (t, _) in enumerate(STEPS)])
def test_simplex_l1_bound_and_argmax(type_name: str, spec: dict) -> None:
    step = build_step(type_name, spec)
    gate = step.kind == "gate"

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
    @given(rows=_rows, seed=st.integers(0, 1000))
    def check(rows: list[list[float]], seed: int) -> None:
        y = _probs(rows)
        x = random_x(len(y), seed=seed)
        out = step.apply(y, x) if gate else step(y, x)
        assert out.shape == y.shape and out.dtype == torch.float32
        assert out.min() >= 0 and torch.allclose(out.sum(dim=1), torch.ones(len(y)), atol=1e-5)
        if step.l1_bound is not None:
            assert (out - y).abs().sum(dim=1).max() <= step.l1_bound + 1e-5
        if step.preserves_argmax:
            assert torch.equal(out.argmax(dim=1), y.argmax(dim=1))

    check()


def test_declarations() -> None:
    """The declarations the properties above rely on (a wrong declaration would make them vacuous)."""
    assert build_step("mad", {"epsilon": 0.5, "oracle": "argmax", "surrogate": "s"}).preserves_argmax
    assert not build_step("mad", {"epsilon": 0.5, "surrogate": "s"}).preserves_argmax
    assert build_step("mad", {"epsilon": 0.5, "surrogate": "s"}).l1_bound == 0.5
    assert build_step("randp", {"epsilon": 0.3}).l1_bound == 0.3
    assert build_step("grad2", {"epsilon": 0.5, "surrogates": ["a"]}).l1_bound == 0.5
    assert build_step("top_k", {"k": 1}).preserves_argmax and build_step("labels", {}).preserves_argmax
    assert build_step("round", {"decimals": 2}).l1_bound == pytest.approx(0.1)
