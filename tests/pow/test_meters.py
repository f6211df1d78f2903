"""Leakage meters: proxies by hand, GNMax votes from fake teachers, kNN votes, folder round trips."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from misleader.errors import MisleaderError
from misleader.pow import meters as mt
from misleader.pow.rdp import gnmax_epsilon


class FixedLogits(nn.Module):
    """Predicts class ``label`` for every input. Shape: (N, ...) -> (N, K)."""

    def __init__(self, label: int, k: int = 3) -> None:
        super().__init__()
        self.label, self.k = label, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.k)
        out[:, self.label] = 5.0
        return out


def test_entropy_and_gap_by_hand() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    x = torch.zeros(3, 1, 2, 2)
    # entropies: 0, ln 2 = 0.693147, ln 3 = 1.098612;  gaps: 1 - (1 - 0) = 0, 1 - 0 = 1, 1 - 0 = 1
    # (probabilities are float32, as an oracle answers them: 1/3 is exact to ~1e-8)
    assert mt.EntropyMeter().cost(x, probs).tolist() == pytest.approx([0.0, math.log(2), math.log(3)], abs=1e-7)
    assert mt.GapMeter().cost(x, probs).tolist() == pytest.approx([0.0, 1.0, 1.0], abs=1e-6)
    with pytest.raises(ValueError):
        mt.EntropyMeter().cost(x, None)


def test_pate_meter_counts_teacher_votes() -> None:
    teachers = [FixedLogits(0)] * 20 + [FixedLogits(2)] * 10
    m = mt.PateMeter(teachers=teachers, num_classes=3, sigma=1.0, delta=1e-5)
    x = torch.rand(5, 1, 2, 2)
    assert m.votes(x, None).tolist() == [[20, 0, 10]] * 5
    expected = gnmax_epsilon(torch.tensor([[20, 0, 10]]), sigma=1.0, delta=1e-5)
    assert m.cost(x).tolist() == pytest.approx([float(expected[0])] * 5)
    # unanimous teachers cost less than split ones
    unanimous = mt.PateMeter(teachers=[FixedLogits(1)] * 30, num_classes=3, sigma=1.0, delta=1e-5)
    assert float(unanimous.cost(x[:1])[0]) < float(expected[0])


def test_knn_meter_votes_with_neighbours_labels() -> None:
    # training points in log-prob space: two near class-0-confident outputs (label 0), one far (label 1)
    feats = torch.tensor([[0.0, -10.0], [-0.01, -9.0], [-10.0, 0.0]])
    m = mt.KnnMeter(features=feats, labels=torch.tensor([0, 0, 1]), k=2, sigma=1.0, delta=1e-5)
    x = torch.zeros(2, 1, 2, 2)
    probs = torch.tensor([[1 - 4.5e-5, 4.5e-5], [4.5e-5, 1 - 4.5e-5]])
    assert m.votes(x, probs).tolist() == [[2, 0], [1, 1]]
    with pytest.raises(MisleaderError):
        mt.KnnMeter(features=feats, labels=torch.tensor([0, 0, 1]), k=4)


def test_meter_folders_round_trip(tiny_victim, tmp_path) -> None:
    torch.set_num_threads(1)
    for name, opts in (("pate", {"teachers": 2, "teacher_epochs": 1, "teacher_arch": "lenet5_fifth"}),
                       ("knn", {"k": 5}), ("entropy", {})):
        cfg = mt.train_meter(victim=tiny_victim, meter=name, out=tmp_path / name, device="cpu", **opts)
        assert cfg["meter"] == name and not list((tmp_path / name).glob("*.pt"))
        m, conf = mt.load_meter(tmp_path / name)
        xb = torch.rand(4, *conf["input_shape"])
        c = m.cost(xb)
        assert c.shape == (4,) and bool((c >= 0).all())
    # a changed weights file is refused
    blob = (tmp_path / "knn" / mt.WEIGHTS).read_bytes()
    (tmp_path / "knn" / mt.WEIGHTS).write_bytes(blob[:-4] + b"\0\0\0\0")
    with pytest.raises(MisleaderError, match="corrupted"):
        mt.load_meter(tmp_path / "knn")


def test_a_missing_meter_or_calibration_folder_names_the_command_that_writes_it(tmp_path):
    from misleader.pow.calibration import load_calibration

    with pytest.raises(MisleaderError, match="misleader pow train-meter"):
        mt.load_meter(tmp_path / "nope")
    with pytest.raises(MisleaderError, match="misleader pow calibrate"):
        load_calibration(tmp_path / "nope")
