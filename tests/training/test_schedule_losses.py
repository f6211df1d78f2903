"""training/schedule.py and training/losses.py against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from misleader.training.losses import kl_rows
from misleader.training.schedule import cosine_factor, cosine_lambda


def test_cosine_factor_hand_values():
    # 0.5 (1 + cos(pi s / 8)) at s = 0, 2, 4, 6, 8, and held at 0 past the end
    want = [1.0, 0.5 * (1 + math.sqrt(0.5)), 0.5, 0.5 * (1 - math.sqrt(0.5)), 0.0, 0.0]
    got = [cosine_factor(s, total_steps=8) for s in (0, 2, 4, 6, 8, 11)]
    assert got == pytest.approx(want, abs=1e-12)
    assert cosine_factor(0, total_steps=0) == 1.0 and cosine_factor(5, total_steps=0) == 0.0  # T clamped to 1
    assert cosine_lambda(8)(4) == 0.5


def test_cosine_lambda_drives_an_optimiser_to_the_hand_values():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(4))
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2, 0.1 * (1 + math.sqrt(0.5)), 0.1, 0.1 * (1 - math.sqrt(0.5)), 0.0], abs=1e-9)


def test_kl_rows_hand_values():
    # KL([.5, .5] || [.25, .75]) = .5 ln 2 + .5 ln(2/3) = .5 ln(4/3); identical rows give 0
    p = torch.tensor([[0.5, 0.5], [0.1, 0.9]]).log()
    q = torch.tensor([[0.25, 0.75], [0.1, 0.9]]).log()
    assert kl_rows(p, q).tolist() == pytest.approx([0.5 * math.log(4 / 3), 0.0], abs=1e-6)
    # logits: shifting a row changes nothing; KL is not symmetric
    assert kl_rows(p + 3.0, q - 1.0).tolist() == pytest.approx([0.5 * math.log(4 / 3), 0.0], abs=1e-6)
    assert float(kl_rows(q, p)[0]) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)
    assert kl_rows(p.half(), q.half()).dtype == torch.float32
