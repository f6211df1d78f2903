"""Adaptive streams: cheapest-first ordering and the honest-mixing stream's deviation control."""

from __future__ import annotations

import torch
from torch import nn

from misleader.oracle.base import ModelOracle
from misleader.pow.adaptive import cheapest_first, mixed_stream
from misleader.pow.calibration import PowConfig
from misleader.pow.meters import LeakageMeter
from misleader.pow.metering import PowMeter, metered_oracle


class MeanPixelMeter(LeakageMeter):
    """A row costs its mean pixel value."""

    name = "mean-pixel"

    def cost(self, x: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
        return x.flatten(1).mean(1).double()


def _setup() -> tuple[PowMeter, object]:
    cfg = PowConfig(cost_per_query=0.5, base=2.0, honest_seconds=0.01, hash_rate=1e4, step_queries=2)
    pm = PowMeter(meter=MeanPixelMeter(), config=cfg)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    return pm, metered_oracle(ModelOracle(model, num_classes=2, input_shape=(1, 2, 2)), pm)


def test_cheapest_first_orders_by_meter_cost() -> None:
    pm, _ = _setup()
    pool = torch.tensor([0.9, 0.1, 0.5, 0.3]).view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    assert cheapest_first(pm, pool).tolist() == [1, 3, 2, 0]


def test_mixed_stream_keeps_the_deviation_bounded() -> None:
    pm, oracle = _setup()
    pool = torch.ones(20, 1, 2, 2)  # cost 1 per row (honest: 0.5)
    filler = torch.zeros(20, 1, 2, 2)  # cost 0 per row
    x, y, n_filler = mixed_stream(oracle, pool, filler, queries=16, batch_size=2)
    # starts with pool (deviation 0 is not above), then alternates: pool, filler, pool, filler ...
    assert len(x) == len(y) == 16 == pm.queries == oracle.queries_used and n_filler == 8
    assert abs(pm.cumulative_cost - 0.5 * pm.queries) <= 1.0
    # without filler the same 16 pool rows deviate by 8
    pm2, oracle2 = _setup()
    mixed_stream(oracle2, pool, filler[:0], queries=16, batch_size=2)
    assert abs(pm2.cumulative_cost - 0.5 * pm2.queries) == 8.0
