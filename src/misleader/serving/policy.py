"""What the gateway asks of a client beyond its key: proof-of-work bits and (hook) a detector.

``--pow-bits N`` gives :class:`FixedBits`; ``--pow DIR`` reads ``DIR/pow.json``
(``{"bits": N}``, optionally ``"ttl"``; calibrated meters will add their own keys and a
:class:`PowPolicy` of their own). A detector is any :class:`Detector` (``score(x) -> (N,)``);
the ``--detector`` policies (``log``, ``gate``, ``refuse``) plug in here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from misleader.errors import MisleaderError


class PowPolicy(Protocol):
    """Bits a client must pay for a batch."""

    ttl: float

    def bits(self, *, key_id: str, x: torch.Tensor) -> int: ...

    def describe(self) -> str:
        """One line for the status page."""


@dataclass(frozen=True)
class FixedBits:
    """The same difficulty for every batch."""

    n: int
    ttl: float = 300.0

    def bits(self, *, key_id: str, x: torch.Tensor) -> int:
        return self.n

    def describe(self) -> str:
        return f"{self.n} bits per batch"


def load_pow_policy(path: str | Path) -> PowPolicy:
    """The policy of a PoW config folder (``pow.json``)."""
    from misleader.oracle.manifest import read_json_file
    from misleader.pow.puzzle import check_bits

    cfg = read_json_file(Path(path) / "pow.json", what="PoW config")
    try:
        return FixedBits(check_bits(cfg["bits"]), float(cfg.get("ttl", 300.0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise MisleaderError(f"{path}/pow.json: {exc}: write {{\"bits\": N}} with N in [0, 40]") from None


class Detector(Protocol):
    """Scores each row of a batch (higher: more suspicious); ``flag`` says whether the key is flagged."""

    def score(self, *, key_id: str, x: torch.Tensor) -> torch.Tensor: ...

    def flagged(self, key_id: str) -> bool: ...


__all__ = ["Detector", "FixedBits", "PowPolicy", "load_pow_policy"]
