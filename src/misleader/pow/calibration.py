"""Calibration: the honest user's expected cost, and deviation -> delay seconds -> puzzle bits.

Paper: Dziedzic et al., ICLR 2022, https://arxiv.org/abs/2201.09243 (reference code
``pow/proof_of_work.py``). An honest stream (in-distribution validation queries in batches) gives the
expected cost per query, Ĉ (least-squares slope through the origin of the cumulative cost at each
batch). A client who has sent n queries of cumulative cost C is charged, every ``step_queries``
queries, a puzzle whose expected solving time is

    t = clamp(t_honest * base ** |C - Ĉ n|, t_honest * min_factor, t_honest * max_factor)

and whose difficulty is bits = clamp(round(log2(t * hash_rate)), min_bits, max_bits), with
``hash_rate`` this machine's measured SHA-256 rate (:func:`misleader.pow.puzzle.measure_hash_rate`):
the expected work is 2^bits hashes. All constants are in the folder's ``config.json``.

Deviations from the reference code:
  * The reference's delay is base^diff seconds with base 1.0075 (its MNIST PATE meter, honest cost
    0.259 per query), so an honest user waits about 1 s per batch whose raw time is 0.46 s. Our
    meters have other cost scales and our raw query time is milliseconds, so (a) the base is the
    reference's rate per *honest query's worth* of deviation, base = exp(ln(1.0075) * 0.259 / Ĉ)
    (override with ``--base``), and (b) the honest delay ``t_honest`` is ``honest_overhead`` (0.5)
    times this machine's measured raw seconds per step, so the honest overhead ratio is comparable to
    the reference's. The clamp keeps the reference's [0.1, 2948] range relative to that delay.
  * Seconds -> bits uses expected hashes (2^bits) at a measured hash rate, not the reference's table
    of its own solver's timings; bits never exceed :data:`misleader.pow.puzzle.MAX_BITS`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from misleader.errors import MisleaderError
from misleader.pow.puzzle import MAX_BITS, measure_hash_rate
from misleader.utils import read_json, write_json

log = logging.getLogger(__name__)

CALIBRATION_FORMAT = 1
#: ln(1.0075) * 0.259: the reference's MNIST exponent per honest query's worth of deviation
REFERENCE_RATE = math.log(1.0075) * 0.259


@dataclass(frozen=True)
class PowConfig:
    """The constants that turn a client's cumulative cost into puzzle difficulty."""

    cost_per_query: float  # Ĉ: honest expected cost per query
    base: float  # delay multiplier per unit of |C - Ĉ n|
    honest_seconds: float  # t_honest: target delay per step at zero deviation
    hash_rate: float  # SHA-256 hashes per second of the reference solver on this machine
    step_queries: int = 64  # one puzzle per this many queries
    min_factor: float = 0.1
    max_factor: float = 2948.0
    min_bits: int = 0
    max_bits: int = MAX_BITS

    def __post_init__(self) -> None:
        if not (self.cost_per_query > 0 and self.base >= 1 and self.honest_seconds > 0 and self.hash_rate > 0
                and self.step_queries >= 1 and 0 < self.min_factor <= 1 <= self.max_factor
                and 0 <= self.min_bits <= self.max_bits <= MAX_BITS):
            raise MisleaderError(f"invalid PoW calibration constants {asdict(self)}: re-run `misleader pow calibrate`")

    def deviation(self, *, cost: float, queries: int) -> float:
        """|C - Ĉ n|."""
        return abs(cost - self.cost_per_query * queries)

    def seconds(self, deviation: float) -> float:
        """Target delay (s) for a deviation, clamped to [t_honest * min_factor, t_honest * max_factor]."""
        log_t = math.log(self.honest_seconds) + deviation * math.log(self.base)
        lo = math.log(self.honest_seconds * self.min_factor)
        hi = math.log(self.honest_seconds * self.max_factor)
        return math.exp(min(max(log_t, lo), hi))

    def bits(self, deviation: float) -> int:
        """Puzzle bits for a deviation: round(log2(t * hash_rate)), within [min_bits, max_bits]."""
        b = round(math.log2(self.seconds(deviation) * self.hash_rate))
        return int(min(max(b, self.min_bits), self.max_bits, MAX_BITS))

    def puzzle_seconds(self, bits: int) -> float:
        """Expected solving time of a ``bits`` puzzle at :attr:`hash_rate` (2^bits hashes)."""
        return 2.0**bits / self.hash_rate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_cost_per_query(queries: torch.Tensor, cumulative: torch.Tensor) -> float:
    """Least-squares slope through the origin: sum(n C) / sum(n^2). Shapes: (B,), (B,) -> float."""
    n, c = queries.double(), cumulative.double()
    return float((n * c).sum() / (n * n).sum())


def base_for(cost_per_query: float) -> float:
    """The reference's exponential rate transferred to a meter whose honest cost is ``cost_per_query``."""
    return math.exp(REFERENCE_RATE / cost_per_query)


def calibrate(*, meter: str | Path, out: str | Path, data_dir: str | Path | None = None, seed: int = 0,
              device: str = "cpu", batch_size: int = 64, queries: int | None = None, step_queries: int = 64,
              honest_overhead: float = 0.5, base: float | None = None, honest_seconds: float | None = None,
              hash_seconds: float = 2.0, max_bits: int = MAX_BITS, force: bool = False) -> dict[str, Any]:
    """Measure an honest stream on the validation split and write ``out/config.json``; returns it."""
    from misleader.data.loader import to_unit
    from misleader.oracle.base import ModelOracle
    from misleader.pow.meters import load_meter, open_victim
    from misleader.training.victim import load_target_data
    from misleader.utils import resolve_device, seed_everything

    out = Path(out)
    if (out / "config.json").exists() and not force:
        log.info("%s already holds a calibration; pass --force to redo it", out)
        return read_json(out / "config.json")
    if honest_overhead <= 0:
        raise MisleaderError(f"--honest-overhead must be > 0, got {honest_overhead}")
    meter_dir = Path(meter).resolve()
    dev = resolve_device(device)
    gen = seed_everything(seed)
    m, mconf = load_meter(meter_dir, device=dev)
    victim, vmeta = open_victim(mconf["victim"], device=dev)
    oracle = ModelOracle(victim, num_classes=int(vmeta["num_classes"]), input_shape=vmeta["input_shape"], device=dev)
    data, splits = load_target_data(vmeta, data_dir=data_dir)
    val = splits.val[torch.randperm(len(splits.val), generator=gen)]
    if queries is not None:
        val = val[:queries]
    costs, ns, raw = [], [], 0.0
    for idx in val.split(batch_size):
        xb = to_unit(data.x_train[idx])
        t0 = time.perf_counter()
        probs = oracle.query(xb)
        raw += time.perf_counter() - t0
        costs.append(m.cost(xb, probs))
        ns.append(len(idx))
    cost = torch.cat(costs)
    n_cum = torch.tensor(ns).cumsum(0)
    c_cum = torch.stack([c.sum() for c in costs]).cumsum(0)
    rate = fit_cost_per_query(n_cum, c_cum)
    if rate <= 0:
        raise MisleaderError("the honest stream cost nothing under this meter: the meter cannot calibrate PoW")
    raw_per_step = raw / len(cost) * step_queries
    hash_rate = measure_hash_rate(hash_seconds)
    cfg = PowConfig(cost_per_query=rate, base=base if base is not None else base_for(rate),
                    honest_seconds=honest_seconds if honest_seconds is not None else honest_overhead * raw_per_step,
                    hash_rate=hash_rate, step_queries=step_queries, max_bits=max_bits)
    dev_curve = (c_cum - rate * n_cum).abs()
    config = {
        "format": CALIBRATION_FORMAT, "kind": "pow-calibration", "meter_name": m.name,
        "meter": {"path": str(meter_dir), "sha256": hashlib.sha256((meter_dir / "config.json").read_bytes()).hexdigest()},
        **cfg.to_dict(),
        "honest": {"split": "val", "queries": int(len(cost)), "batch_size": batch_size,
                   "cost_per_query_mean": float(cost.mean()), "cost_per_query_std": float(cost.std()),
                   "cost_min": float(cost.min()), "cost_max": float(cost.max()),
                   "max_abs_deviation": float(dev_curve.max()), "raw_seconds": raw,
                   "raw_seconds_per_step": raw_per_step, "honest_overhead": honest_overhead},
        "seed": seed,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    log.info("calibrated %s: %.4f per honest query, base %.5f, t_honest %.4gs, %.3g hashes/s", m.name, rate,
             cfg.base, cfg.honest_seconds, hash_rate)
    return config


def load_calibration(folder: str | Path) -> tuple[PowConfig, dict[str, Any]]:
    """The :class:`PowConfig` and full config of a calibration folder (``misleader pow calibrate``)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise MisleaderError(f"{folder} is not a PoW calibration folder (no config.json): make one with "
                             "`misleader pow calibrate --meter M --out DIR`, or pass the folder it wrote")
    config = read_json(folder / "config.json")
    if config.get("kind") != "pow-calibration" or config.get("format") != CALIBRATION_FORMAT:
        raise MisleaderError(f"{folder} is not a PoW calibration folder: make one with `misleader pow calibrate`")
    fields = PowConfig.__dataclass_fields__
    return PowConfig(**{k: config[k] for k in fields if k in config}), config
