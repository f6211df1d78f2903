"""misleader demo: the main job on the embedded digits (victim, MISLEADER, Knockoff and DFME, report)."""

from __future__ import annotations

import argparse

from misleader.commands.common import positive_int


def add_parser(sub) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "demo", help="the whole story on the embedded digits in minutes on 2 CPU cores",
        description="Train a LeNet5 victim on the embedded digits, build the MISLEADER ensemble, run Knockoff "
                    "(soft and hard labels) and DFME against both, print the tables and write OUT/report/report.md "
                    "with CSVs and figures. Resumable: rerun to finish an interrupted demo.")
    p.add_argument("--out", default="demo-out", help="output folder (default ./demo-out)")
    p.add_argument("--data-dir", default=None, help="dataset root (not needed: digits is embedded)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--jobs", type=positive_int, default=None,
                   help="runs in parallel (processes; default 2 where there are 2 cores, else 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from misleader.experiments.demo import run_demo

    run_demo(out=args.out, data_dir=args.data_dir, device=args.device, jobs=args.jobs)
    return 0
