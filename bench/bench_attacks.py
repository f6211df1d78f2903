"""Queries per second of every registered attack at a small budget (a benchmark, not a test).

For each name in ``ATTACKS`` that has a config below (names it does not know yet are skipped), run
the attack through the harness against ``--target`` and report ``queries_used / seconds`` where
``seconds`` is the attack's own wall time (querying *and* training the clone; the harness's test-set
evaluations are excluded). Also reports the raw oracle throughput (answering pool images in batches
of 256), the ceiling for any attack, measured before and after each attack in the same run, and each
attack's ``ratio_to_oracle`` (its queries/s over the mean of those two rates: the machine's load changes
both alike). Attacks run with their default preset for the target (``preset="auto"``) unless a config
names options.

    python bench/bench_attacks.py --target /tmp/v_mnist --data-dir /work/shared/data --threads 2
    python bench/bench_attacks.py                      # trains a small digits victim first

Writes ``bench/results/attacks.json`` (``--out`` to change) and prints one JSON line per attack.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

#: small configurations per attack name (budget, labels, options, pool)
CONFIGS: dict[str, dict] = {
    "knockoff": {"budget": 5000, "labels": "soft", "options": {"epochs": 5}, "pool": "attacker"},
    "knockoff-adaptive": {"attack": "knockoff", "budget": 5000, "labels": "soft",
                          "options": {"epochs": 5, "strategy": "adaptive", "reward": "all"}, "pool": "attacker"},
    "knockoff-hard": {"attack": "knockoff", "budget": 5000, "labels": "hard", "options": {"epochs": 5},
                      "pool": "attacker"},
    "knockoff-hard-10k": {"attack": "knockoff", "budget": 10_000, "labels": "hard", "options": {},
                          "pool": "attacker"},
    "dfme": {"budget": 20_000, "labels": "soft", "options": {}},
    "dfme-ngf32": {"attack": "dfme", "budget": 20_000, "labels": "soft", "options": {"preset": "small", "ngf": 32}},
    "dfme-bf16": {"attack": "dfme", "budget": 20_000, "labels": "soft", "options": {"cpu_bf16": True}},
    "dfme-small-fast": {"attack": "dfme", "budget": 20_000, "labels": "soft", "options": {"preset": "small-fast"}},
    "dfms-hl": {"budget": 30_000, "labels": "hard", "options": {"preset": "cpu"}},
}


def _small_victim(root: Path) -> Path:
    from misleader.training.victim import train_victim

    out = root / "victim"
    train_victim(dataset="digits", arch="lenet5", epochs=5, out=out, device="cpu", seed=0)
    return out


def oracle_throughput(target: Path, *, data_dir: str | None, pool: str = "attacker", n: int = 5000) -> float:
    """Rows per second the target's oracle answers (batches of 256 pool images)."""
    from misleader.attacks.pools import load_pool
    from misleader.data import to_unit
    from misleader.oracle import describe_target, load_oracle

    x, _ = load_pool(pool, target_meta=describe_target(target), data_dir=data_dir)
    x = x[:n]
    oracle = load_oracle(target, device="cpu")
    t0 = time.perf_counter()
    for chunk in x.split(256):
        oracle.query(to_unit(chunk))
    return len(x) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=None, help="victim or defense folder (default: train a digits LeNet5)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the CI machine)")
    p.add_argument("--only", default=None, help="comma-separated config names (default: all known)")
    p.add_argument("--clone-arch", default="lenet5")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "attacks.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MISLEADER_PROGRESS", "0")

    import misleader
    import misleader.attacks  # noqa: F401  (registers every attack present)
    from misleader.attacks import ATTACKS
    from misleader.attacks.harness import run_attack

    tmp = Path(tempfile.mkdtemp(prefix="bench_attacks_"))
    target = Path(args.target) if args.target else _small_victim(tmp)
    digits = not args.target
    rows = []
    qps = oracle_throughput(target, data_dir=args.data_dir)
    print(json.dumps({"oracle_queries_per_s": round(qps, 1), "target": str(target)}), flush=True)
    wanted = args.only.split(",") if args.only else list(CONFIGS)
    for key in wanted:
        cfg = CONFIGS.get(key)
        name = (cfg or {}).get("attack", key)
        if cfg is None or name not in ATTACKS:
            print(json.dumps({"config": key, "skipped": "attack not registered or no config"}), flush=True)
            continue
        options = dict(cfg.get("options", {}))
        if digits and name == "knockoff":
            options["repeat_pool"] = True  # the digits attacker split has only ~240 images
        pool = cfg.get("pool")
        if digits and pool is None and ATTACKS.get(name).needs_pool:
            pool = "attacker"
        before = oracle_throughput(target, data_dir=args.data_dir)
        res = run_attack(name, target=target, budget=cfg["budget"], clone_arch=args.clone_arch, out=tmp / key,
                         data_dir=args.data_dir, seed=0, device="cpu", labels=cfg["labels"], pool=pool,
                         options=options)
        oracle_rate = (before + oracle_throughput(target, data_dir=args.data_dir)) / 2
        qps_attack = res["queries_used"] / res["seconds"]
        row = {"config": key, "attack": name, "labels": cfg["labels"], "budget": cfg["budget"],
               "queries_used": res["queries_used"], "seconds": round(res["seconds"], 2),
               "queries_per_s": round(qps_attack, 1), "oracle_rows_per_s": round(oracle_rate, 1),
               "ratio_to_oracle": round(qps_attack / oracle_rate, 4), "load_average": os.getloadavg()[0],
               "projected_2m_minutes": round(2_000_000 / qps_attack / 60, 1),
               "clone_accuracy": round(res["clone_accuracy"], 4), "options": options}
        rows.append(row)
        print(json.dumps(row), flush=True)
    from misleader.utils import environment, write_json

    write_json(args.out, {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
                          "code": str(Path(misleader.__file__).resolve().parent),
                          "target": str(target), "threads": args.threads, "oracle_queries_per_s": qps,
                          "load_average": os.getloadavg(), "rows": rows, "environment": environment()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
