"""Learning-rate schedules shared by victim and defense training (one cosine for the project).

Example:
    >>> [round(cosine_factor(s, total_steps=4), 4) for s in range(6)]
    [1.0, 0.8536, 0.5, 0.1464, 0.0, 0.0]
"""

from __future__ import annotations

import math
from typing import Callable


def cosine_factor(step: int, *, total_steps: int) -> float:
    """``0.5 (1 + cos(pi min(step, T) / T))`` with ``T = max(1, total_steps)``: 1 at step 0, 0 from step T on."""
    total = max(1, total_steps)
    return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def cosine_lambda(total_steps: int) -> Callable[[int], float]:
    """:func:`cosine_factor` as a ``LambdaLR`` multiplier over ``total_steps`` optimiser steps."""
    return lambda step: cosine_factor(step, total_steps=total_steps)


__all__ = ["cosine_factor", "cosine_lambda"]
