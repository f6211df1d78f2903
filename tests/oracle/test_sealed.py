"""Sealed oracles: nothing an attack (or any caller) holds can raise the budget or reset the count."""

from __future__ import annotations

import pytest
import torch

from misleader import QueryBudgetExceeded
from misleader.models import create_model
from misleader.oracle import ModelOracle, SealedOracle
from misleader.oracle.base import Accountant

SHAPE = (1, 32, 32)


def _oracle(budget=10, **kw) -> ModelOracle:  # noqa: ANN001
    torch.manual_seed(0)
    return ModelOracle(create_model("lenet5_fifth", in_channels=1, num_classes=5), num_classes=5, input_shape=SHAPE,
                       budget=budget, **kw)


@pytest.mark.parametrize("name, value", [("budget", 10**9), ("on_query", print), ("reset_count", None),
                                         ("queries_used", 0), ("remaining", 10**9), ("output", "probs")])
def test_load_oracle_result_cannot_be_raised_or_reset(tiny_victim, name, value):
    from misleader import load_oracle

    o = load_oracle(tiny_victim, budget=10)
    with pytest.raises(AttributeError):
        setattr(o, name, value)
    assert not hasattr(o, "reset_count")
    assert o.budget == 10


@pytest.mark.parametrize("budget", [2.5, True, -1, "10", 1e3])
def test_budget_must_be_a_non_negative_int(budget):
    with pytest.raises(ValueError, match="budget"):
        _oracle(budget=budget)


def test_numpy_and_python_ints_are_budgets():
    import numpy as np

    assert _oracle(budget=np.int64(7)).budget == 7 and isinstance(_oracle(budget=np.int64(7)).budget, int)


def _abuse(view: SealedOracle) -> None:
    """Try every public attribute of the view: set it, delete it, call it with tempting arguments."""
    for name in dir(view):
        if name.startswith("_"):
            continue
        for value in (10**9, 0, None, lambda *a, **k: None):
            with pytest.raises(AttributeError):
                setattr(view, name, value)
        with pytest.raises(AttributeError):
            delattr(view, name)
        attr = getattr(view, name)
        if callable(attr) and name not in ("query",):
            for args in ((), (10**9,), (0,)):
                try:
                    attr(*args)
                except Exception:  # noqa: BLE001 - anything but a widened budget is fine
                    pass
    for name in ("reset_count", "on_query", "accountant", "budget_", "refund"):
        with pytest.raises(AttributeError):
            setattr(view, name, 0)


def test_attack_cannot_exceed_budget_through_any_public_attribute():
    o = _oracle(budget=12)
    view = o.sealed()
    view.query(torch.rand(5, *SHAPE))
    _abuse(view)
    assert view.budget == 12 and view.queries_used == 5 and view.remaining == view.queries_left == 7
    view(torch.rand(7, *SHAPE))
    with pytest.raises(QueryBudgetExceeded):
        view.query(torch.rand(1, *SHAPE))
    assert o.queries_used == 12
    # the view exposes no module, no oracle, no accountant
    for name in dir(view):
        if not name.startswith("_"):
            v = getattr(view, name)
            assert not isinstance(v, (torch.nn.Module, Accountant)) and not hasattr(v, "_probs")


def test_harness_accountant_sees_the_true_count_and_hook(tiny_victim):
    from misleader.oracle import open_accounted

    seen = []
    o, acct = open_accounted(tiny_victim, budget=6)
    acct.on_query = seen.append
    o.sealed().query(torch.rand(4, *o.input_shape))
    assert acct.used == o.queries_used == 4 and seen == [4]
    with pytest.raises(QueryBudgetExceeded):
        o.query(torch.rand(3, *o.input_shape))
    assert acct.used == 4 and acct.remaining == 2


class _Failing(ModelOracle):
    def _probs(self, x):  # noqa: ANN001
        raise RuntimeError("backend down")


def test_rows_are_refunded_when_evaluation_fails():
    torch.manual_seed(0)
    o = _Failing(create_model("lenet5_fifth", in_channels=1, num_classes=5), num_classes=5, input_shape=SHAPE,
                 budget=4)
    with pytest.raises(RuntimeError, match="backend down"):
        o.query(torch.rand(3, *SHAPE))
    assert o.queries_used == 0 and o.remaining == 4


class _Liar(torch.Tensor):
    """A tensor subclass that reports min/max inside [0, 1] whatever its values."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        if getattr(func, "__name__", "") in ("min", "max", "amin", "amax", "aminmax", "isfinite", "all"):
            return torch.tensor(0.5) if func.__name__ != "isfinite" else torch.ones((), dtype=torch.bool)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensor_subclass_cannot_fake_its_range():
    x = (torch.rand(2, *SHAPE) * 50).as_subclass(_Liar)
    assert float(x.min()) == 0.5  # the lie works on the subclass itself
    o = _oracle(budget=10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        o.query(x)
    assert o.queries_used == 0


@pytest.mark.parametrize("make, match", [
    (lambda: torch.empty(2, *SHAPE, device="meta"), "meta"),
    (lambda: torch.rand(2, *SHAPE).to_sparse(), "dense"),
    (lambda: torch.zeros(2, *SHAPE, dtype=torch.complex64), "floating"),
    (lambda: torch.zeros(2, *SHAPE, dtype=torch.bool), "floating"),
])
def test_meta_sparse_and_non_float_tensors_are_value_errors(make, match):
    o = _oracle()
    with pytest.raises(ValueError, match=match):
        o.query(make())
    assert o.queries_used == 0
