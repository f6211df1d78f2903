"""Metering a query stream: what calibrated proof-of-work would have charged it (the ``pow`` block).

Paper: Dziedzic et al., ICLR 2022, https://arxiv.org/abs/2201.09243 (reference code
``PoW.recompute_timings`` in ``pow/proof_of_work.py``). A :class:`PowMeter` follows one client: each
answered row adds its leakage cost; every ``step_queries`` rows (crossed anywhere inside a batch) it
charges one puzzle for the deviation at that point. The attack harness calls
:meth:`PowMeter.observe` for every answered batch and writes :meth:`PowMeter.summary` as ``pow``.

Deviations from the reference code: one puzzle per ``step_queries`` rows whatever the client's batch
size (the reference's server charges per 64-row batch, its offline simulation per 1000 queries); a
final incomplete step is not charged.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from misleader.pow.calibration import PowConfig, load_calibration
from misleader.pow.meters import LeakageMeter, load_meter

log = logging.getLogger(__name__)

#: at most this many (queries, cost, bits) points are kept in the summary's trace
TRACE_POINTS = 200


class PowMeter:
    """Per-client PoW accounting.

    Args:
        meter: the leakage meter (:meth:`LeakageMeter.cost`).
        config: the calibrated constants.

    Attributes:
        queries: rows observed. cumulative_cost: their summed cost. puzzle_seconds: expected solving
        time of the puzzles charged so far at ``config.hash_rate``.
    """

    def __init__(self, *, meter: LeakageMeter, config: PowConfig) -> None:
        self.meter, self.config = meter, config
        self.queries = 0
        self.cumulative_cost = 0.0
        self.puzzle_seconds = 0.0
        self.target_seconds = 0.0
        self.meter_seconds = 0.0
        self.bits: list[int] = []
        self.trace: list[tuple[int, float, int]] = []

    @classmethod
    def from_folder(cls, folder: str | Path, *, device: torch.device | str = "cpu") -> "PowMeter":
        """Open a calibration folder (``misleader pow calibrate``) and the meter it names."""
        from misleader.errors import MisleaderError
        import hashlib

        config, raw = load_calibration(folder)
        meter_dir = Path(raw["meter"]["path"])
        digest = hashlib.sha256((meter_dir / "config.json").read_bytes()).hexdigest()
        if digest != raw["meter"]["sha256"]:
            raise MisleaderError(f"meter {meter_dir} changed since {folder} was calibrated: re-run `misleader pow calibrate`")
        meter, _ = load_meter(meter_dir, device=device)
        return cls(meter=meter, config=config)

    def observe(self, x: torch.Tensor, probs: torch.Tensor | None = None) -> None:
        """Account for rows just answered. Shapes: (N, C, H, W) in [0, 1], (N, K) probabilities or None."""
        t0 = time.perf_counter()
        cost = self.meter.cost(x.detach(), None if probs is None or probs.dim() != 2 else probs.detach())
        cost = cost.double().cpu()
        if cost.shape != (x.shape[0],):
            raise ValueError(f"meter returned shape {tuple(cost.shape)} for {x.shape[0]} rows")
        step = self.config.step_queries
        cum = self.cumulative_cost + cost.cumsum(0)
        first = self.queries // step + 1
        last = (self.queries + len(cost)) // step
        for s in range(first, last + 1):
            n = s * step
            c = float(cum[n - self.queries - 1])
            d = self.config.deviation(cost=c, queries=n)
            b = self.config.bits(d)
            self.bits.append(b)
            self.puzzle_seconds += self.config.puzzle_seconds(b)
            self.target_seconds += self.config.seconds(d)
            self.trace.append((n, c, b))
        self.queries += len(cost)
        self.cumulative_cost = float(cum[-1]) if len(cost) else self.cumulative_cost
        self.meter_seconds += time.perf_counter() - t0

    def summary(self, raw_seconds: float) -> dict[str, Any]:
        """The ``pow`` block: cumulative cost, puzzle seconds, raw seconds and the overhead ratio.

        Args:
            raw_seconds: wall time the oracle spent answering this stream (without the meter).
        """
        c = self.config
        stride = max(1, len(self.trace) // TRACE_POINTS)
        raw_seconds = float(raw_seconds)
        return {
            "meter": self.meter.name,
            "queries": self.queries,
            "cumulative_cost": self.cumulative_cost,
            "cost_per_query": self.cumulative_cost / max(self.queries, 1),
            "honest_cost_per_query": c.cost_per_query,
            "deviation": c.deviation(cost=self.cumulative_cost, queries=self.queries),
            "puzzles": len(self.bits),
            "bits_mean": sum(self.bits) / len(self.bits) if self.bits else 0.0,
            "bits_max": max(self.bits, default=0),
            "hash_rate": c.hash_rate,
            "puzzle_seconds": self.puzzle_seconds,
            "target_seconds": self.target_seconds,
            "raw_seconds": raw_seconds,
            "overhead_ratio": (self.puzzle_seconds + raw_seconds) / raw_seconds if raw_seconds > 0 else None,
            "meter_seconds": self.meter_seconds,
            "step_queries": c.step_queries,
            "trace": [list(t) for t in self.trace[::stride]],
        }


class MeteredOracle:
    """An oracle wrapper that meters every answered batch and times the inner oracle.

    It forwards ``query`` and the oracle's public attributes; ``raw_seconds`` is the time spent
    inside the wrapped oracle only.
    """

    def __init__(self, oracle: Any, meter: PowMeter) -> None:
        self._oracle = oracle
        self.meter = meter
        self.raw_seconds = 0.0

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Shape: (N, C, H, W) in [0, 1] -> the wrapped oracle's answer."""
        t0 = time.perf_counter()
        out = self._oracle.query(x)
        self.raw_seconds += time.perf_counter() - t0
        self.meter.observe(x, out if out.dim() == 2 else None)
        return out

    __call__ = query

    def __getattr__(self, name: str) -> Any:
        if name in ("num_classes", "input_shape", "output", "queries_used", "budget", "remaining", "validate"):
            return getattr(self._oracle, name)
        raise AttributeError(name)

    def summary(self) -> dict[str, Any]:
        return self.meter.summary(self.raw_seconds)


def metered_oracle(oracle: Any, meter: PowMeter) -> MeteredOracle:
    """Wrap ``oracle`` so that every answered batch is metered by ``meter``."""
    return MeteredOracle(oracle, meter)


def run_stream(oracle: MeteredOracle, x: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """Send ``x`` (uint8 or float (N, C, H, W)) through ``oracle`` in order, ``batch_size`` rows at a time.

    Returns:
        The answers, concatenated (CPU).
    """
    from misleader.data.loader import to_unit

    return torch.cat([oracle.query(to_unit(chunk)).cpu() for chunk in x.split(batch_size)])


def honest(*, pow_dir: str | Path, out: str | Path, target: str | Path | None = None,
           data_dir: str | Path | None = None, seed: int = 0, device: str = "cpu", batch_size: int = 64,
           queries: int | None = None) -> dict[str, Any]:
    """An honest stream (test-split queries in random order, in batches) metered; writes ``out/result.json``."""
    from misleader.oracle.load import describe_target, load_oracle
    from misleader.training.victim import load_target_data
    from misleader.utils import environment, resolve_device, seed_everything, write_json

    dev = resolve_device(device)
    gen = seed_everything(seed)
    meter = PowMeter.from_folder(pow_dir, device=dev)
    _, raw = load_calibration(pow_dir)
    victim_path = read_meter_victim(raw)
    target = Path(target) if target is not None else Path(victim_path)
    data, _ = load_target_data(describe_target(target), data_dir=data_dir)
    order = torch.randperm(len(data.x_test), generator=gen)
    if queries is not None:
        order = order[:queries]
    oracle = metered_oracle(load_oracle(target, device=dev), meter)
    run_stream(oracle, data.x_test[order], batch_size=batch_size)
    if oracle.queries_used != meter.queries:
        raise RuntimeError(f"accounting mismatch: oracle answered {oracle.queries_used}, meter saw {meter.queries}")
    result = {"stream": "honest", "split": "test", "batch_size": batch_size, "target": str(target),
              "pow_dir": str(Path(pow_dir).resolve()), "seed": seed, "queries_used": oracle.queries_used,
              "pow": oracle.summary(), "environment": environment()}
    write_json(Path(out) / "result.json", result)
    return result


def read_meter_victim(calibration: dict[str, Any]) -> str:
    """The victim folder a calibration's meter refers to."""
    from misleader.utils import read_json

    return read_json(Path(calibration["meter"]["path"]) / "config.json")["victim"]["path"]
