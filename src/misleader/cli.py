"""The ``misleader`` command. Errors a user can fix print one line (no traceback) and exit 2."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from misleader import __version__
from misleader.errors import MisleaderError

#: subcommand modules under misleader.commands, in --help order
COMMANDS = ["train_victim", "defend", "attack", "run", "report", "demo", "models", "serve", "keys", "query"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="misleader",
        description="Defend ML APIs against model extraction (MISLEADER, arXiv 2506.02362), and measure it.",
    )
    parser.add_argument("--version", action="version", version=f"misleader {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"misleader.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"misleader.commands.{name}":
                raise
            continue
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from misleader.utils import set_quiet

    set_quiet(args.quiet)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except MisleaderError as exc:
        print(f"misleader: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("misleader: interrupted (finished work is saved; re-run the same command to resume)", file=sys.stderr)
        return 130
    except FileNotFoundError as exc:
        print(f"misleader: error: {exc.filename or exc}: file not found", file=sys.stderr)
        return 2
