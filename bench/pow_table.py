"""Collect metered-stream results into one table (not a test).

Usage: python bench/pow_table.py RUNS_DIR [RUNS_DIR ...] > bench/results/pow_mnist.json
Each RUNS_DIR holds honest/, ood/, id/, cheapest/, mixed/ (result.json from ``misleader pow honest|stream``)
and dfme/ (pow.json from bench/pow_attacks.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEYS = ("queries", "cumulative_cost", "cost_per_query", "honest_cost_per_query", "puzzles", "bits_mean", "bits_max",
        "puzzle_seconds", "raw_seconds", "overhead_ratio", "hash_rate")


def main() -> None:
    table = []
    for runs in map(Path, sys.argv[1:]):
        for name in ("honest", "id", "ood", "cheapest", "mixed", "dfme"):
            for f in (runs / name / "result.json", runs / name / "pow.json"):
                if f.exists() and "pow" in (r := json.loads(f.read_text())):
                    row = {"runs": str(runs), "stream": name, **{k: r["pow"][k] for k in KEYS}}
                    row.update({k: r[k] for k in ("clone_accuracy", "filler_queries", "pool") if k in r})
                    table.append(row)
                    break
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
