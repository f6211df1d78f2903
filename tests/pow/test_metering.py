"""Metering: step charging arithmetic, query counts match, the pow block, and the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch

from misleader.cli import main
from misleader.oracle.base import ModelOracle
from misleader.pow.calibration import PowConfig
from misleader.pow.meters import LeakageMeter
from misleader.pow.metering import PowMeter, metered_oracle, run_stream


class ConstantMeter(LeakageMeter):
    """Every row costs ``value``."""

    name = "constant"

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def cost(self, x: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
        return torch.full((x.shape[0],), self.value, dtype=torch.float64)


def _config(rate: float = 1.0) -> PowConfig:
    return PowConfig(cost_per_query=rate, base=2.0, honest_seconds=1 / 64, hash_rate=1024.0, step_queries=4,
                     max_factor=1e6)


def test_one_puzzle_per_step_whatever_the_batching() -> None:
    # 10 rows at cost 3 vs honest 1 per query; steps at 4 and 8 rows: deviations 8 and 16
    # -> t = 2^8 / 64 = 4 s (4096 hashes, 12 bits) and 2^16 / 64 = 1024 s (2^20 hashes, 20 bits)
    for sizes in ([10], [1] * 10, [3, 3, 4], [7, 3]):
        pm = PowMeter(meter=ConstantMeter(3.0), config=_config())
        for n in sizes:
            pm.observe(torch.zeros(n, 1, 2, 2))
        assert pm.queries == 10 and pm.cumulative_cost == pytest.approx(30.0)
        assert pm.bits == [12, 20]
        assert pm.puzzle_seconds == pytest.approx(4 + 1024)
    # with the default clamp (2948 x the honest delay = 46.06 s -> 47,165 hashes) the second puzzle has 16 bits
    pm = PowMeter(meter=ConstantMeter(3.0), config=PowConfig(cost_per_query=1.0, base=2.0, honest_seconds=1 / 64,
                                                              hash_rate=1024.0, step_queries=4))
    pm.observe(torch.zeros(10, 1, 2, 2))
    assert pm.bits == [12, 16]
    s = pm.summary(raw_seconds=2.0)
    assert s["overhead_ratio"] == pytest.approx((4 + 64 + 2) / 2)
    assert s["deviation"] == pytest.approx(20.0) and s["puzzles"] == 2


def test_honest_rate_pays_the_honest_delay() -> None:
    pm = PowMeter(meter=ConstantMeter(1.0), config=_config())
    pm.observe(torch.zeros(16, 1, 2, 2))
    # deviation 0 at every step: t = 1/64 s -> 16 hashes -> 4 bits, 4 puzzles of 16/1024 s
    assert pm.bits == [4, 4, 4, 4] and pm.puzzle_seconds == pytest.approx(4 * 16 / 1024)


def test_metered_stream_query_count_equals_the_meters(tiny_victim) -> None:
    from misleader.training.checkpoint import load_model

    model, meta = load_model(tiny_victim)
    oracle = ModelOracle(model, num_classes=meta["num_classes"], input_shape=meta["input_shape"])
    pm = PowMeter(meter=ConstantMeter(0.5), config=_config(rate=0.5))
    mo = metered_oracle(oracle, pm)
    x = torch.rand(37, *meta["input_shape"])
    out = run_stream(mo, x, batch_size=5)
    assert out.shape == (37, meta["num_classes"])
    assert mo.queries_used == oracle.queries_used == pm.queries == 37
    assert mo.summary()["queries"] == 37 and mo.raw_seconds > 0


def test_cli_meter_calibrate_honest_stream(tiny_victim, tmp_path, capsys) -> None:
    torch.set_num_threads(1)
    m, p = tmp_path / "m", tmp_path / "p"
    assert main(["-q", "pow", "train-meter", "--victim", str(tiny_victim), "--meter", "entropy", "--out", str(m),
                 "--device", "cpu"]) == 0
    assert main(["-q", "pow", "calibrate", "--meter", str(m), "--out", str(p), "--hash-seconds", "0.05",
                 "--queries", "128", "--device", "cpu"]) == 0
    cfg = json.loads((p / "config.json").read_text())
    assert cfg["cost_per_query"] > 0 and cfg["hash_rate"] > 0 and cfg["max_bits"] <= 40
    assert main(["-q", "pow", "honest", "--pow", str(p), "--out", str(tmp_path / "h"), "--queries", "128",
                 "--device", "cpu"]) == 0
    honest = json.loads((tmp_path / "h" / "result.json").read_text())
    assert honest["queries_used"] == honest["pow"]["queries"] == 128
    assert honest["pow"]["overhead_ratio"] >= 1.0
    assert main(["-q", "pow", "stream", "--pow", str(p), "--out", str(tmp_path / "s"), "--order", "cheapest",
                 "--queries", "64", "--clone-epochs", "1", "--clone-arch", "lenet5_fifth", "--device", "cpu"]) == 0
    s = json.loads((tmp_path / "s" / "result.json").read_text())
    assert s["pow"]["queries"] == 64 and 0 <= s["clone_accuracy"] <= 1
    # any attack through the harness, metered: the meter saw exactly the rows the oracle answered
    assert main(["-q", "attack", "knockoff", "--target", str(tiny_victim), "--budget", "150", "--clone-arch",
                 "lenet5_fifth", "-o", "epochs=1", "--pow", str(p), "--out", str(tmp_path / "a"),
                 "--device", "cpu"]) == 0
    a = json.loads((tmp_path / "a" / "result.json").read_text())
    assert a["queries_used"] == a["pow"]["queries"] == 150
    assert a["pow"]["overhead_ratio"] >= 1.0 and a["pow"]["raw_seconds"] > 0
    capsys.readouterr()
