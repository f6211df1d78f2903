"""Arguments shared by subcommands."""

from __future__ import annotations

import argparse


def add_common(p: argparse.ArgumentParser, *, data: bool = True, device: bool = True) -> None:
    if data:
        p.add_argument("--data-dir", default=None,
                       help="dataset root in torchvision layout (default: $MISLEADER_DATA, else ./data)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    if device:
        p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")


def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v
