"""Oracle contract: counting, budget refusal, output modes, input validation, no gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from misleader import QueryBudgetExceeded
from misleader.oracle import EnsembleOracle, ModelOracle, soft_vote
from misleader.models import create_model


def _model(seed: int = 0, k: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("lenet5_fifth", in_channels=1, num_classes=k)


@pytest.fixture(scope="module")
def model():
    return _model()


def _oracle(model, **kw):
    return ModelOracle(model, num_classes=5, input_shape=(1, 32, 32), **kw)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 17), min_size=1, max_size=6), budget=st.integers(0, 60))
def test_counts_rows_and_refuses_before_evaluating(model, sizes, budget):
    calls = []
    o = _oracle(model, budget=budget, on_query=calls.append)
    used = 0
    for n in sizes:
        x = torch.rand(n, 1, 32, 32)
        if used + n > budget:
            with pytest.raises(QueryBudgetExceeded):
                o.query(x)
            assert o.queries_used == used  # nothing counted, nothing answered
        else:
            out = o.query(x)
            used += n
            assert out.shape == (n, 5)
        assert o.queries_used == used <= budget
        assert o.remaining == budget - used
    assert sum(calls) == used


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_probs_on_simplex_and_labels_are_argmax(model, n, seed):
    x = torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))
    p = _oracle(model, batch_size=7).query(x)
    assert p.dtype == torch.float32 and p.shape == (n, 5)
    assert (p >= 0).all() and torch.allclose(p.sum(1), torch.ones(n), atol=1e-5)
    labels = _oracle(model, output="labels").query(x)
    assert labels.dtype == torch.int64 and labels.shape == (n,)
    assert torch.equal(labels, p.argmax(1))


def test_answers_do_not_depend_on_chunking(model):
    x = torch.rand(50, 1, 32, 32)
    a = _oracle(model, batch_size=3).query(x)
    b = _oracle(model, batch_size=1000).query(x)
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.rand(2, 1, 28, 28), "shape"),
        (torch.rand(2, 3, 32, 32), "shape"),
        (torch.rand(1, 32, 32), "shape"),
        (torch.rand(0, 1, 32, 32), "empty"),
        (torch.randint(0, 255, (2, 1, 32, 32), dtype=torch.uint8), "floating"),
        (torch.full((2, 1, 32, 32), float("nan")), "NaN"),
        (torch.full((2, 1, 32, 32), float("inf")), "NaN or inf"),
        (torch.rand(2, 1, 32, 32) + 1.0, r"\[0, 1\]"),
        (torch.rand(2, 1, 32, 32) - 1.0, r"\[0, 1\]"),
        ([[0.5]], "torch.Tensor"),
    ],
)
def test_input_validation_names_the_problem(model, bad, match):
    o = _oracle(model, budget=100)
    with pytest.raises(ValueError, match=match):
        o.query(bad)
    assert o.queries_used == 0


@settings(max_examples=15, deadline=None)
@given(lo=st.floats(-1e6, 2.0, allow_nan=False), hi=st.floats(-1.0, 1e6, allow_nan=False))
def test_range_validation_property(model, lo, hi):
    x = torch.zeros(1, 1, 32, 32)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = lo, hi
    lo, hi = float(x[0, 0, 0, 0]), float(x[0, 0, 0, 1])  # as float32 sees them
    o = _oracle(model)
    if 0 <= lo <= 1 and 0 <= hi <= 1:
        assert o.query(x).shape == (1, 5)
    else:
        with pytest.raises(ValueError):
            o.query(x)


def test_no_gradients_and_no_model_exposed(model):
    o = _oracle(model)
    x = torch.rand(3, 1, 32, 32, requires_grad=True)
    p = o.query(x)
    assert not p.requires_grad and p.grad_fn is None
    # the answer is an ordinary tensor usable as a training target
    logits = torch.randn(3, 5, requires_grad=True)
    nn.functional.kl_div(logits.log_softmax(1), p, reduction="batchmean").backward()
    assert logits.grad is not None
    # no public attribute or method hands out a module (in-process isolation is by convention only)
    public = {k: getattr(o, k) for k in dir(o) if not k.startswith("_")}
    assert not any(isinstance(v, nn.Module) for v in public.values())


def test_ensemble_is_mean_of_member_softmaxes():
    members = [_model(s) for s in range(3)]
    x = torch.rand(9, 1, 32, 32)
    o = EnsembleOracle(members, num_classes=5, input_shape=(1, 32, 32))
    with torch.no_grad():
        expected = torch.stack([m(x).softmax(1) for m in members]).mean(0)
        assert torch.allclose(soft_vote([m(x) for m in members]), expected, atol=1e-6)
    assert torch.allclose(o.query(x), expected, atol=1e-6)
    w = EnsembleOracle(members, num_classes=5, input_shape=(1, 32, 32), weights=[1, 0, 0])
    with torch.no_grad():
        assert torch.allclose(w.query(x), members[0](x).softmax(1), atol=1e-6)


def test_budget_zero_and_bad_arguments(model):
    with pytest.raises(QueryBudgetExceeded):
        _oracle(model, budget=0).query(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError):
        _oracle(model, output="logits")
    with pytest.raises(ValueError):
        _oracle(model, budget=-1)
