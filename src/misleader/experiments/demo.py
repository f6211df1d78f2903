"""``misleader demo``: the whole story on the embedded digits, in minutes on 2 CPU cores.

Train a LeNet5 victim on scikit-learn's digits, build the MISLEADER ensemble (lenet5, lenet5_half,
lenet5_fifth), attack the undefended victim and the ensemble with Knockoff Nets (soft and hard labels,
the disjoint in-distribution attacker split) and DFME (data-free, soft labels), then print the tables
and write ``OUT/report/report.md`` with its CSVs and figures. It is ``misleader run`` on
:data:`DEMO_SPEC` (identical to ``experiments/demo.yaml``) followed by ``misleader report``, so it is
resumable the same way: rerun it and only unfinished runs execute.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from misleader.errors import MisleaderError

log = logging.getLogger(__name__)

#: the demo grid; ``experiments/demo.yaml`` holds the same mapping (a test checks it)
DEMO_SPEC: dict[str, Any] = {
    "name": "demo",
    "description": "MISLEADER vs. Knockoff (soft/hard) and DFME on the embedded digits, minutes on 2 CPU cores",
    "dataset": "digits",
    "victim": {"arch": "lenet5", "epochs": 30},
    "defenses": [
        {"name": "undefended"},
        {"name": "misleader", "members": ["lenet5", "lenet5_half", "lenet5_fifth"], "epochs": 30,
         "preset": "digits-cpu"},
    ],
    "attacks": [
        # the reference's SGD 0.01/0.5 hardly trains a clone on 240 images: see experiments/demo.yaml
        {"name": "knockoff", "label": "knockoff-soft", "labels": "soft", "pool": "attacker",
         "budgets": [80, 240], "options": {"epochs": 60, "lr": 0.05, "momentum": 0.9}},
        {"name": "knockoff", "label": "knockoff-hard", "labels": "hard", "pool": "attacker",
         "budgets": [80, 240], "options": {"epochs": 60, "lr": 0.05, "momentum": 0.9}},
        {"name": "dfme", "label": "dfme", "labels": "soft", "budgets": ["50k"], "eval_every": "5k",
         "options": {"preset": "small-fast"}, "seeds": [0, 1]},
    ],
    "clone_archs": ["lenet5"],
    "seeds": [0, 1, 2],
}


def default_jobs() -> int:
    """Two runs at a time where there are two cores (each with half of the cores as torch threads)."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def run_demo(*, out: str | Path = "demo-out", data_dir: str | Path | None = None, device: str = "auto",
             jobs: int | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo grid into ``out``, build the report and print its tables with ``echo``.

    Args:
        jobs: runs in parallel (default :func:`default_jobs`): the grid is ~50 small runs, and on a
            2-core machine two one-thread processes beat one two-thread process, much more so when
            the machine is shared (measured: a MISLEADER ensemble took 31 s of CPU with one thread).

    Returns:
        ``{"out", "report", "figures", "seconds", "runs", "failed"}``.

    Raises:
        MisleaderError: some runs failed (the report is still written from the finished ones).
    """
    from misleader.experiments.report import build_report
    from misleader.experiments.runner import run_experiment
    from misleader.experiments.spec import parse_spec

    t0 = time.perf_counter()
    spec = parse_spec(DEMO_SPEC, source="demo")
    echo(f"misleader demo: {spec.description}")
    echo(f"writing to {Path(out).resolve()} (rerun the same command to resume)\n")
    jobs = jobs or default_jobs()
    summary = run_experiment(spec, out=out, data_dir=data_dir, device=device, jobs=jobs)
    rep = build_report(out)
    echo("")
    echo(rep.to_text())
    echo("")
    seconds = time.perf_counter() - t0
    echo(f"report: {rep.markdown_path}")
    for path in rep.figures.values():
        echo(f"figure: {path}")
    echo(f"demo finished in {seconds / 60:.1f} min ({summary.finished} runs executed, {summary.cached} reused)")
    if not summary.ok:
        raise MisleaderError(f"{len(summary.failed)} demo runs failed ({'; '.join(e for _, e in summary.failed)[:300]}): "
                             f"see {Path(out) / 'index.json'} and rerun to retry")
    return {"out": str(out), "report": str(rep.markdown_path), "figures": [str(p) for p in rep.figures.values()],
            "seconds": seconds, "runs": summary.total, "failed": len(summary.failed)}


__all__ = ["DEMO_SPEC", "run_demo"]
