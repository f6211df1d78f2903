"""Meter-aware attacker streams against calibrated proof-of-work, and the clone they buy.

Paper: Dziedzic et al., ICLR 2022, https://arxiv.org/abs/2201.09243 (reference code
``active_learning.py`` modes ``WorstCase``/``WorstCasePATE``: the attacker knows the exact cost and
queries its pool cheapest-first). Streams here:

* ``random``: the pool in random order (Knockoff Nets' random strategy; the pool decides whether it is
  out-of-distribution, e.g. Fashion-MNIST against an MNIST victim, or in-distribution).
* ``cheapest``: the pool sorted by the true meter cost, cheapest first (the paper's worst case).
* ``mixed``: the attacker also holds in-distribution "filler" images; whenever its cumulative cost is
  above the honest expectation it sends the cheapest filler it has left (cost below Ĉ lowers the
  deviation), else the next pool batch. Filler queries are answered and paid for like any other.

The clone is trained on every answered row with the answers as soft targets (Knockoff's transfer
set), and its test accuracy is reported next to the ``pow`` block.

Deviations from the reference code: the attacker's knowledge of the meter is the defender's meter
itself (an upper bound on what an attacker can know); clone training is a plain Adam fit, not the
reference's per-attack recipes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from misleader.data.loader import TensorLoader, to_unit
from misleader.errors import MisleaderError
from misleader.pow.metering import MeteredOracle, PowMeter, metered_oracle

log = logging.getLogger(__name__)

ORDERS = ("random", "cheapest", "mixed")


@torch.inference_mode()
def meter_costs(meter: PowMeter, x: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """The meter's per-row cost of ``x`` (uint8 or float (N, C, H, W)) without charging anything. -> (N,)."""
    return torch.cat([meter.meter.cost(to_unit(c)) for c in x.split(batch_size)]).double()


def cheapest_first(meter: PowMeter, pool: torch.Tensor) -> torch.Tensor:
    """Indices of ``pool`` sorted by meter cost, ascending. Shape: (N, C, H, W) -> (N,) int64."""
    return meter_costs(meter, pool).argsort(stable=True)


def mixed_stream(oracle: MeteredOracle, pool: torch.Tensor, filler: torch.Tensor, *, queries: int,
                 batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Send pool batches, and cheapest-first filler batches whenever the cost runs above Ĉ n.

    Args:
        pool: the attack rows, in the order to send them.
        filler: in-distribution rows, in the order to spend them (cheapest first).
        queries: total rows to send (pool + filler).

    Returns:
        (x sent (uint8/float as given), answers, number of filler rows sent).
    """
    meter = oracle.meter
    xs, ys = [], []
    p = f = 0
    sent = 0
    while sent < queries:
        above = meter.cumulative_cost > meter.config.cost_per_query * meter.queries
        use_filler = above and f < len(filler) or p >= len(pool)
        if use_filler and f >= len(filler):
            break
        src, start = (filler, f) if use_filler else (pool, p)
        chunk = src[start:start + min(batch_size, queries - sent)]
        if use_filler:
            f += len(chunk)
        else:
            p += len(chunk)
        xs.append(chunk)
        ys.append(oracle.query(to_unit(chunk)).cpu())
        sent += len(chunk)
    return torch.cat(xs), torch.cat(ys), f


def train_clone(*, x: torch.Tensor, y: torch.Tensor, arch: str, num_classes: int, epochs: int,
                generator: torch.Generator, device: torch.device) -> torch.nn.Module:
    """Fit ``arch`` to answered rows: soft targets (N, K) with cross-entropy, or hard labels (N,)."""
    from misleader.models import create_model

    clone = create_model(arch, in_channels=int(x.shape[1]), num_classes=num_classes, mean=[0.5] * x.shape[1],
                         std=[0.5] * x.shape[1]).to(device)
    opt = torch.optim.Adam(clone.parameters(), lr=1e-3)
    loader = TensorLoader(x, y, batch_size=128, shuffle=True, generator=generator, device=device)
    clone.train()
    for _ in range(epochs):
        for xb, yb in loader:
            logits = clone(to_unit(xb))
            loss = -(yb * F.log_softmax(logits, 1)).sum(1).mean() if yb.dim() == 2 else F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return clone.eval()


def stream(*, pow_dir: str | Path, out: str | Path, order: str, queries: int, pool: str | None = None,
           target: str | Path | None = None, data_dir: str | Path | None = None, seed: int = 0,
           device: str = "cpu", batch_size: int = 64, clone_arch: str = "lenet5",
           clone_epochs: int = 0) -> dict[str, Any]:
    """Run a metered attacker stream; with ``clone_epochs`` > 0 also train and test a clone. Writes result.json."""
    from misleader.data import load_dataset
    from misleader.metrics import accuracy
    from misleader.oracle.load import describe_target, load_oracle
    from misleader.pow.metering import read_meter_victim
    from misleader.pow.calibration import load_calibration
    from misleader.training.evaluate import predict_probs
    from misleader.training.victim import load_target_data
    from misleader.utils import environment, resolve_device, seed_everything, write_json

    if order not in ORDERS:
        raise MisleaderError(f"unknown stream order {order!r}: choose one of {', '.join(ORDERS)}")
    if order == "mixed" and pool is None:
        raise MisleaderError("the mixed stream mixes in-distribution filler into an out-of-distribution --pool: "
                             "name one (e.g. --pool fashion-mnist)")
    dev = resolve_device(device)
    gen = seed_everything(seed)
    meter = PowMeter.from_folder(pow_dir, device=dev)
    target = Path(target) if target is not None else Path(read_meter_victim(load_calibration(pow_dir)[1]))
    meta = describe_target(target)
    data, splits = load_target_data(meta, data_dir=data_dir)
    if pool is None:  # in-distribution: the attacker's split, disjoint from the defender's data
        pool_x, pool_name = data.x_train[splits.attacker], f"{meta['dataset']}:attacker-split"
    else:
        pool_x, pool_name = load_dataset(pool, data_dir=data_dir).x_train, pool
        if tuple(pool_x.shape[1:]) != tuple(data.input_shape):
            raise MisleaderError(f"pool {pool} has shape {tuple(pool_x.shape[1:])}, the target expects "
                                 f"{tuple(data.input_shape)}: pick a pool of the same image size")
    pool_x = pool_x[torch.randperm(len(pool_x), generator=gen)]
    oracle = metered_oracle(load_oracle(target, device=dev), meter)
    t0 = time.perf_counter()
    filler_rows = 0
    if order == "mixed":
        filler = data.x_train[splits.attacker]
        filler = filler[cheapest_first(meter, filler)]
        x_sent, answers, filler_rows = mixed_stream(oracle, pool_x, filler, queries=queries, batch_size=batch_size)
    else:
        if order == "cheapest":
            pool_x = pool_x[cheapest_first(meter, pool_x)]
        x_sent = pool_x[:queries]
        answers = torch.cat([oracle.query(to_unit(c)).cpu() for c in x_sent.split(batch_size)])
    attack_seconds = time.perf_counter() - t0
    if oracle.queries_used != meter.queries:
        raise RuntimeError(f"accounting mismatch: oracle answered {oracle.queries_used}, meter saw {meter.queries}")
    result: dict[str, Any] = {"stream": order, "pool": pool_name, "target": str(target), "queries_used": meter.queries,
                              "filler_queries": filler_rows, "batch_size": batch_size, "seed": seed,
                              "stream_seconds": attack_seconds, "pow": oracle.summary()}
    if clone_epochs > 0:
        clone = train_clone(x=x_sent, y=answers, arch=clone_arch, num_classes=data.num_classes, epochs=clone_epochs,
                            generator=gen, device=dev)
        result.update(clone_arch=clone_arch, clone_epochs=clone_epochs,
                      clone_accuracy=accuracy(predict_probs(clone, data.x_test, device=dev), data.y_test))
    result["environment"] = environment()
    write_json(Path(out) / "result.json", result)
    return result
