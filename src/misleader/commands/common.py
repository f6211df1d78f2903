"""Arguments shared by subcommands."""

from __future__ import annotations

import argparse
import math


def add_common(p: argparse.ArgumentParser, *, data: bool = True, device: bool = True) -> None:
    if data:
        p.add_argument("--data-dir", default=None,
                       help="dataset root in torchvision layout (default: $MISLEADER_DATA, else ./data)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    if device:
        p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")


def positive_int(s: str) -> int:
    """argparse type: an integer >= 1 (a word is an argparse error, not a traceback)."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number such as 10, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def positive_float(s: str) -> float:
    """argparse type: a finite number > 0 (learning rates, temperatures ...).

    Example:
        >>> positive_float("0.1")
        0.1
        >>> positive_float("-1")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be a finite number > 0, got -1.0
    """
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 0.01, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {v}")
    return v
