"""Measurement (not a test): meter a harness attack with calibrated PoW, until the harness has ``--pow``.

Usage: PYTHONPATH=src .venv/bin/python bench/pow_attacks.py --pow P --attack dfme --target V --budget N
       --clone-arch lenet5 --out DIR [--pool fashion-mnist] [-o key=value ...]
It runs :func:`misleader.attacks.harness.run_attack` with the attacker's budgeted oracle wrapped by
:func:`misleader.pow.metering.metered_oracle` (the referee oracle is not metered), checks that the
meter saw exactly the oracle's queries, and writes DIR/pow.json (the ``pow`` block + clone accuracy).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

import misleader.oracle.load as oracle_load
from misleader.attacks.harness import run_attack
from misleader.pow.metering import PowMeter, metered_oracle
from misleader.utils import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pow", required=True)
    ap.add_argument("--attack", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--budget", type=int, required=True)
    ap.add_argument("--clone-arch", default="lenet5")
    ap.add_argument("--out", required=True)
    ap.add_argument("--pool", default=None)
    ap.add_argument("--labels", default="soft")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", action="append", default=[], help="attack option KEY=VALUE")
    args = ap.parse_args()
    options = {k.replace("-", "_"): yaml.safe_load(v) for k, _, v in (o.partition("=") for o in args.o)}
    meter = PowMeter.from_folder(args.pow)
    wrapped = []
    real = oracle_load.load_oracle

    def patched(path, **kw):  # noqa: ANN001, ANN003
        oracle = real(path, **kw)
        if kw.get("budget") is None:
            return oracle  # the harness's referee: not the attacker's queries
        wrapped.append(metered_oracle(oracle, meter))
        return wrapped[-1]

    oracle_load.load_oracle = patched
    res = run_attack(args.attack, target=args.target, budget=args.budget, clone_arch=args.clone_arch, out=args.out,
                     data_dir=args.data_dir, seed=args.seed, device="cpu", labels=args.labels, pool=args.pool,
                     options=options)
    (mo,) = wrapped
    assert mo.queries_used == meter.queries == res["queries_used"], (mo.queries_used, meter.queries)
    out = {"attack": args.attack, "pool": args.pool, "budget": args.budget, "clone_accuracy": res["clone_accuracy"],
           "attack_seconds": res["seconds"], "pow": mo.summary()}
    write_json(Path(args.out) / "pow.json", out)
    print(json.dumps({k: out["pow"][k] for k in ("queries", "cumulative_cost", "puzzle_seconds", "raw_seconds",
                                                  "overhead_ratio")} | {"clone_accuracy": res["clone_accuracy"]}))


if __name__ == "__main__":
    main()
