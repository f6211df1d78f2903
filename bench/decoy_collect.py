"""Collect runs/attacks/*/result.json into docs/results/decoy/attacks.json (mean +- sample std per cell).

Usage: PYTHONPATH=src python bench/decoy_collect.py runs/attacks docs/results/decoy/attacks.json
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

TARGETS = {"v_mnist": "undefended", "d_misleader": "misleader", "d_decoy": "misleader-decoy"}


def main() -> None:
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    runs, cells = [], defaultdict(list)
    for f in sorted(root.glob("*/result.json")):
        r = json.loads(f.read_text())
        name = f.parent.name.rsplit("_s", 1)[0]
        row = {"run": f.parent.name, "cell": name, "attack": r["attack"], "target": TARGETS.get(Path(r["target"]).name,
               r["target"]), "budget": r["budget"], "queries_used": r["queries_used"], "seed": r["seed"],
               "labels": r["labels"], "pool": r.get("pool"), "clone_accuracy": r["clone_accuracy"],
               "fidelity": r["fidelity"], "seconds": r["seconds"],
               "options": {k: v for k, v in r["options"].items() if k in ("seeds", "checks", "sigma", "image_center",
                                                                          "image_scale", "preset")},
               "extra": {k: v for k, v in r.get("extra", {}).items() if isinstance(v, (int, float, str))}}
        runs.append(row)
        cells[name].append(row["clone_accuracy"])
    summary = {k: {"n": len(v), "mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else None}
               for k, v in sorted(cells.items())}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=1) + "\n")
    for k, s in summary.items():
        std = f" ± {100 * s['std']:.1f}" if s["std"] is not None else ""
        print(f"{k:32s} n={s['n']} {100 * s['mean']:.1f}{std}")


if __name__ == "__main__":
    main()
