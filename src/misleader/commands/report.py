"""misleader report: tables and figures from the saved results of an experiment folder."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "report", help="tables (Markdown, CSV) and figures (PNG) from saved results",
        description="Read the finished runs of DIR (written by `misleader run` or `misleader demo`) and write "
                    "report.md, CSV tables and PNG figures into DIR/report. Nothing is recomputed.")
    p.add_argument("dir", help="the --out folder of `misleader run` / `misleader demo`")
    p.add_argument("--report-dir", default=None, help="where to write (default DIR/report)")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    p.add_argument("--print", dest="print_tables", action="store_true", help="print the tables to the terminal")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from misleader.experiments.report import build_report

    rep = build_report(args.dir, report_dir=args.report_dir, figures=not args.no_figures)
    if args.print_tables:
        print(rep.to_text())
        print()
    print(f"report: {rep.markdown_path}")
    for name, path in rep.figures.items():
        print(f"figure: {path}")
    return 0
