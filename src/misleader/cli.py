"""The ``misleader`` command. Errors a user can fix print one line (no traceback) and exit 2."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
from pathlib import Path

from misleader import __version__
from misleader.errors import MisleaderError

#: subcommand modules under misleader.commands, in --help order
COMMANDS = ["train_victim", "defend", "attack", "run", "report", "demo", "models", "pow", "detect", "serve", "keys",
            "query"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="misleader",
        description="Defend ML APIs against model extraction (MISLEADER, arXiv 2506.02362), and measure it.",
    )
    parser.add_argument("--version", action="version", version=f"misleader {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:  # a command that fails to import is a broken installation: never skipped
        mod = importlib.import_module(f"misleader.commands.{name}")
        mod.add_parser(sub)
    return parser


_ERRNO_HINTS: dict[int, str] = {
    errno.EACCES: "permission denied: choose a path you can read and write, or fix its permissions",
    errno.EPERM: "operation not permitted here: choose a path in a normal folder you own",
    errno.EROFS: "read-only file system: choose a path on a writable disk",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder where a file is expected: give a file path",
    errno.EEXIST: "it already exists (and is not what was expected): choose another path or remove it",
    errno.ENOSPC: "no space left on the device: free some space or choose another disk",
    errno.EDQUOT: "disk quota exceeded: free some space or choose another disk",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter one",
    errno.ELOOP: "too many symbolic links: resolve the links in the path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) and retry",
    errno.ENXIO: "no device behind this path (a FIFO or socket?): give a regular file",
}


def os_error_message(exc: OSError) -> str:
    """One line for an :class:`OSError`: the path, what the system said, and how to fix it.

    Example:
        >>> import errno
        >>> os_error_message(PermissionError(errno.EACCES, "Permission denied", "/root/x"))
        '/root/x: permission denied: choose a path you can read and write, or fix its permissions'
    """
    path = exc.filename if exc.filename is not None else ""
    if exc.filename2 is not None:
        path = f"{path} -> {exc.filename2}"
    hint = _ERRNO_HINTS.get(exc.errno or -1)
    if hint is None and exc.errno == errno.ENOENT:
        parent = Path(str(exc.filename)).parent if exc.filename is not None else None
        if parent is not None and parent.is_dir():
            hint = (f"no such file or folder, and {parent} does not accept new ones there (a virtual or special "
                    "file system?): check the name, or choose a path on a normal disk")
        else:
            hint = "no such file or folder: check the path (its parent folders must exist or be creatable)"
    if hint is None:
        hint = f"{exc.strerror or type(exc).__name__}: check the path and retry"
    return f"{path}: {hint}" if path else hint


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
    except OSError as exc:  # a path the user gave that cannot be read or written
        print(f"misleader: error: {os_error_message(exc)}", file=sys.stderr)
        return 2
