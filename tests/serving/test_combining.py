"""Request combining in the served model: concurrent requests answered by one pass, each with its own rows."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from misleader.serving.model import ServedModel


def _wait_for(cond, timeout: float = 10.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.002)


def _concurrent(model: ServedModel, batches: list[torch.Tensor]) -> list[torch.Tensor | BaseException]:
    """Queue every batch while the model is busy (its lock held), then let them run; results in order."""
    results: list[torch.Tensor | BaseException | None] = [None] * len(batches)

    def ask(i: int) -> None:
        try:
            results[i] = model.predict(batches[i])
        except BaseException as exc:  # noqa: BLE001
            results[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(batches))]
    with model._lock:  # the model is "busy": every request queues
        for t in threads:
            t.start()
        _wait_for(lambda: len(model._queue) == len(batches))
    for t in threads:
        t.join(30)
    return results  # type: ignore[return-value]


@pytest.fixture
def model(tiny_victim):
    return ServedModel(tiny_victim, output="probs", device="cpu", max_batch_rows=64)


def test_queued_requests_share_one_pass_and_get_their_own_rows(model):
    g = torch.Generator().manual_seed(0)
    shape = model.input_shape
    batches = [torch.rand(n, *shape, generator=g) for n in (3, 1, 7, 5)]
    alone = [model.predict(b) for b in batches]
    before = model.passes
    got = _concurrent(model, batches)
    assert model.passes - before == 1  # 16 rows <= 64: one pass for all four requests
    for a, b, x in zip(got, alone, batches):
        assert isinstance(a, torch.Tensor) and a.shape == (len(x), model.num_classes)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_pass_never_exceeds_max_batch_rows(model):
    shape = model.input_shape
    batches = [torch.rand(40, *shape) for _ in range(3)]  # 40 + 40 > 64: three passes
    before = model.passes
    got = _concurrent(model, batches)
    assert model.passes - before == 3
    assert all(isinstance(r, torch.Tensor) and len(r) == 40 for r in got)


def test_combining_off_runs_one_pass_per_request(tiny_victim):
    m = ServedModel(tiny_victim, max_batch_rows=0)
    x = torch.rand(4, *m.input_shape)
    threads = [threading.Thread(target=m.predict, args=(x,)) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert m.passes == 5


def test_a_failed_pass_fails_each_of_its_requests_and_the_next_pass_works(model, monkeypatch):
    shape = model.input_shape
    real = model._oracle
    calls = {"n": 0}

    class Flaky:  # what the served model calls with a checked batch
        def _answer_validated(self, x):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("boom")
            return real._answer_validated(x)

    monkeypatch.setattr(model, "_oracle", Flaky())
    got = _concurrent(model, [torch.rand(2, *shape) for _ in range(3)])
    assert all(isinstance(r, RuntimeError) and str(r) == "boom" for r in got)
    assert model.predict(torch.rand(2, *shape)).shape == (2, model.num_classes)
