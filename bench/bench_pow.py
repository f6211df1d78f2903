"""Benchmark: SHA-256 hashes/s of the reference PoW solver, and measured solve times per difficulty.

Usage: PYTHONPATH=src .venv/bin/python bench/bench_pow.py [--seconds 3] [--bits 8,12,16] [--trials 5]
Writes bench/results/pow_hash_rate.json. Not a test: numbers depend on the machine and its load.
The expected solve time of a b-bit puzzle is 2^b / (hashes/s); the measured means are printed next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from misleader.pow.puzzle import issue_challenge, measure_hash_rate, solve, verify, MemorySpentStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds to measure the hash rate")
    ap.add_argument("--bits", default="8,12,16", help="difficulties to time the solver at")
    ap.add_argument("--trials", type=int, default=5, help="challenges per difficulty")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "pow_hash_rate.json"))
    args = ap.parse_args()
    rate = measure_hash_rate(args.seconds)
    secret = os.urandom(32)
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        times, verify_s = [], []
        for _ in range(args.trials):
            token = issue_challenge(secret=secret, client="bench", batch_sha256="0" * 64, bits=bits, ttl=3600)
            t0 = time.perf_counter()
            nonce = solve(token)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            verify(token, solution=nonce, secret=secret, client="bench", batch_sha256="0" * 64,
                   store=MemorySpentStore())
            verify_s.append(time.perf_counter() - t0)
        rows.append({"bits": bits, "expected_seconds": 2**bits / rate, "mean_seconds": sum(times) / len(times),
                     "trials": args.trials, "verify_seconds_mean": sum(verify_s) / len(verify_s)})
        print(json.dumps(rows[-1]))
    result = {"what": "reference SHA-256 PoW solver (pure Python, one core)", "hashes_per_s": rate,
              "measure_seconds": args.seconds, "solves": rows, "platform": platform.platform(),
              "load_avg_1min": os.getloadavg()[0]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"hashes_per_s": rate}))


if __name__ == "__main__":
    main()
