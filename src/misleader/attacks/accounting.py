"""Query accounting shared by the attacks that plan their queries in advance (DFME, DFMS-HL).

An attack sends every row through one :class:`QueryLedger`, which counts what it sent; at the end
:meth:`QueryLedger.check` compares three numbers that must agree: the rows the attack sent, the rows
the oracle says it answered (``oracle.queries_used`` delta) and the attack's own plan (e.g. DFME's
``iterations * cost_per_iteration``). The oracle's own budget still refuses anything beyond it; the
ledger catches an attack whose arithmetic disagrees with what it really did.
"""

from __future__ import annotations

import torch

from misleader.oracle import Oracle


class QueryLedger:
    """Counts the rows an attack sends to ``oracle``.

    Args:
        oracle: the attack's oracle (only ``query`` and ``queries_used`` are used).
        attack: the attack's name (for the error message).
        device: where answers are moved (the attack's device).

    Example:
        >>> ledger = QueryLedger(oracle, attack="dfme", device="cpu")  # doctest: +SKIP
        >>> probs = ledger.query(x)  # doctest: +SKIP
        >>> ledger.check(expected=len(x))  # doctest: +SKIP
    """

    def __init__(self, oracle: Oracle, *, attack: str, device: torch.device | str = "cpu") -> None:
        self._oracle = oracle
        self._start = oracle.queries_used
        self.attack = attack
        self.device = torch.device(device)
        self.spent = 0

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Answer ``x`` (N, C, H, W) in [0, 1]; counts N rows. Returns the oracle's answer on ``device``."""
        out = self._oracle.query(x)
        self.spent += int(x.shape[0])
        return out.to(self.device, non_blocking=True)

    def check(self, *, expected: int) -> None:
        """Raise ``RuntimeError`` unless sent rows == the oracle's count == ``expected``."""
        used = self._oracle.queries_used - self._start
        if used != self.spent or self.spent != expected:
            raise RuntimeError(f"{self.attack} accounting mismatch: oracle counted {used}, attack {self.spent}, "
                               f"expected {expected}")


def device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from ``generator`` (or ``generator`` itself if it lives there)."""
    from misleader.utils import derive_seed

    if generator.device.type == device.type:
        return generator
    return torch.Generator(device=device).manual_seed(derive_seed(generator))


__all__ = ["QueryLedger", "device_generator"]
