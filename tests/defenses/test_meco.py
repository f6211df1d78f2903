"""MeCo: the per-batch random perturbation network (fresh per call, seeded, any batch size, per-sample
filters), the SVGD inner step, and a MeCo folder answering batches of any size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from misleader.defenses.meco import svgd_step
from misleader.defenses.perturbation import RandomPerturbation, draw_weights, perturbation_net
from misleader.oracle.steps import StepContext


def _step(seed: int, **spec) -> RandomPerturbation:
    ctx = StepContext(folder=Path("."), device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed),
                      num_classes=10, input_shape=(1, 32, 32), load_model=lambda name: None)
    return RandomPerturbation.from_manifest({**RandomPerturbation.test_spec, **spec}, ctx=ctx)


def test_perturbation_differs_between_calls_and_repeats_with_the_seed():
    x = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    a, b = _step(0), _step(0)
    first, second = a(x), a(x)
    assert not torch.equal(first, second)  # a fresh network for every query batch
    assert torch.equal(first, b(x)) and torch.equal(second, b(x))  # same seed, same sequence of answers
    assert not torch.equal(first, _step(1)(x))
    assert 0 < float((first - x).abs().mean()) < 1


@pytest.mark.parametrize("n", [1, 2, 7, 64, 65])
def test_perturbation_takes_any_batch_size(n):
    x = torch.rand(n, 1, 32, 32)
    y = _step(0)(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_each_sample_gets_its_own_filters():
    """Row i of a batch equals the same row run alone with the i-th drawn network."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 16, 16, generator=g)
    w = draw_weights(3, in_channels=2, hidden=2, generator=g)
    eps = torch.tensor([0.3, 0.4, 0.5])
    batch = perturbation_net(x, w, eps=eps, norm="instance")
    for i in range(3):
        alone = perturbation_net(x[i:i + 1], [(a[i:i + 1], b[i:i + 1]) for a, b in w], eps=eps[i:i + 1], norm="instance")
        assert torch.allclose(batch[i:i + 1], alone, atol=1e-5)
    same = perturbation_net(x[:1].expand(3, -1, -1, -1), w, eps=eps, norm="instance")
    assert not torch.allclose(same[0], same[1])


def test_svgd_step_with_a_near_diagonal_kernel_is_per_sample_gradient_ascent():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x = torch.rand(4, 3, 2, 2)
    y = torch.tensor([0, 1, 2, 0])
    z = svgd_step(model, x=x, z=x, y=y, lr=0.5, gamma=0.2, bandwidth=1e-6)
    zz = x.clone().requires_grad_(True)
    g = torch.autograd.grad(torch.nn.functional.cross_entropy(model(zz), y, reduction="sum"), zz)[0]
    assert torch.allclose(z, x + 0.5 / 4 * g, atol=1e-6)
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    torch.nn.init.zeros_(flat[1].weight)  # no data gradient: only the kernel term moves the particles
    moved = svgd_step(flat, x=x, z=x, y=y, lr=0.5, gamma=0.0, bandwidth=1.0)
    assert torch.cdist(moved.flatten(1), moved.flatten(1)).sum() > torch.cdist(x.flatten(1), x.flatten(1)).sum()

@pytest.mark.parametrize("sizes", [(1, 5, 33)])
def test_meco_folder_answers_any_batch_size(tiny_victim, tmp_path, sizes):
    from misleader import load_oracle
    from misleader.defenses.meco import MECO, defend_meco

    res = defend_meco(victim=tiny_victim, out=tmp_path / "m", device="cpu", **MECO.test_params)
    assert res["train_seconds"] > 0 and 0 < res["mean_l1_between_answers"] <= 2
    oracle = load_oracle(tmp_path / "m")
    for n in sizes:
        p = oracle.query(torch.rand(n, 1, 32, 32))
        assert p.shape == (n, 10) and torch.allclose(p.sum(1), torch.ones(n), atol=1e-5)


class _CountingTask:
    """A FitTask whose 'weights' are the list of epochs it ran."""

    def __init__(self) -> None:
        self.ran: list[int] = []

    def run_epoch(self, epoch, *, bar):  # noqa: ANN001
        self.ran.append(epoch)
        return {"val_accuracy": [0.5, 0.9, 0.7, 0.6][epoch]}

    def snapshot(self):
        return {"ran": torch.tensor(self.ran)}

    def state_dict(self):
        return {"ran": torch.tensor(self.ran)}

    def load_state_dict(self, state):  # noqa: ANN001
        self.ran = state["ran"].tolist()


def test_epoch_loop_resumes_after_the_last_finished_epoch_and_refuses_other_settings(tmp_path):
    from misleader.defenses.retrain import fit
    from misleader.errors import MisleaderError

    first = _CountingTask()
    fit(first, epochs=2, steps_per_epoch=1, resume_path=tmp_path / "r.pt", settings={"a": 1})
    again = _CountingTask()
    res = fit(again, epochs=4, steps_per_epoch=1, resume_path=tmp_path / "r.pt", settings={"a": 1})
    assert again.ran == [0, 1, 2, 3] and [r["epoch"] for r in res.history] == [1, 2, 3, 4]
    assert res.best_epoch == 2 and res.best["ran"].tolist() == [0, 1]  # selected on validation accuracy
    with pytest.raises(MisleaderError, match="other settings"):
        fit(_CountingTask(), epochs=4, steps_per_epoch=1, resume_path=tmp_path / "r.pt", settings={"a": 2})
