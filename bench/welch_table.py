"""Clone accuracy per (attack, defense) of a `misleader run` folder: mean ± sample std over seeds, and two-sided
Welch t-tests against the undefended cell and against MISLEADER (the numbers of RESULTS.md's grid tables).

Usage:
    python bench/welch_table.py runs/grid [--attacks knockoff-soft@10k,dfme@200k,dfms-hl@100k]
Cells are keyed ``LABEL@BUDGET`` (one spec's label can run at several budgets, or two specs share a label).
Reads each run's ``config.yaml`` (its ``meta``) and ``result.json``; nothing is recomputed. Needs SciPy.
"""

from __future__ import annotations

import argparse
import json
import statistics as st
from pathlib import Path

import yaml
from scipy import stats


def _finished(stage: Path) -> list[Path]:
    """``result.json`` of each finished run folder (not the runner's hidden ``.NAME.partial`` folders)."""
    return sorted(f for f in stage.glob("*/result.json") if not f.parent.name.startswith("."))


def _short(n: int) -> str:
    """200000 -> '200k', 2000000 -> '2M' (the specs' own spelling)."""
    for unit, div in (("M", 1_000_000), ("k", 1_000)):
        if n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def cells(folder: Path) -> tuple[dict, dict]:
    """``{(attack_label, defense_label): {seed: clone_accuracy}}`` and ``{defense_label: result}``."""
    runs: dict[tuple[str, str], dict[int, float]] = {}
    defenses: dict[str, dict] = {}
    for f in _finished(folder / "attacks"):
        meta = yaml.safe_load((f.parent / "config.yaml").read_text())["meta"]
        budget = int(yaml.safe_load((f.parent / "config.yaml").read_text())["config"]["budget"])
        runs.setdefault((f"{meta['attack_label']}@{_short(budget)}", meta["defense_label"]), {})[meta["seed"]] = (
            json.loads(f.read_text())["clone_accuracy"])
    for f in _finished(folder / "defenses"):
        meta = yaml.safe_load((f.parent / "config.yaml").read_text())["meta"]
        defenses[meta.get("defense_label", meta.get("defense"))] = json.loads(f.read_text())
    return runs, defenses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--attacks", default=None, help="comma-separated attack labels (default: all)")
    args = ap.parse_args()
    runs, defenses = cells(args.folder)
    attacks = args.attacks.split(",") if args.attacks else sorted({a for a, _ in runs})
    for attack in attacks:
        print(f"## {attack}")
        refs = {name: [v for _, v in sorted(runs.get((attack, name), {}).items())]
                for name in ("undefended", "misleader")}
        for (a, defense), by_seed in sorted(runs.items()):
            if a != attack:
                continue
            v = [x for _, x in sorted(by_seed.items())]
            r = defenses.get(defense, {})
            line = (f"{defense:30s} test {100 * r.get('test_accuracy', float('nan')):6.2f} "
                    f"L1 {r.get('mean_l1_to_victim', float('nan')):.3f} | clone {100 * st.mean(v):.1f} ± "
                    f"{100 * st.stdev(v) if len(v) > 1 else 0:.1f} (n={len(v)}) {[round(100 * x, 1) for x in v]}")
            for name, ref in refs.items():
                if name != defense and len(v) > 1 and len(ref) > 1:
                    p = stats.ttest_ind(v, ref, equal_var=False).pvalue
                    line += f" | vs {name} {100 * (st.mean(v) - st.mean(ref)):+.1f} p={p:.3f}{' *' if p < 0.05 else ''}"
            print(line)


if __name__ == "__main__":
    main()
