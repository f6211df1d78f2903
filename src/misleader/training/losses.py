"""The KL divergence between logit rows shared by every trainer (one helper for the project; the
metric on probability rows is :func:`misleader.metrics.kl_divergence`).

Example:
    >>> import torch
    >>> p = torch.tensor([[0.0, 0.0]])
    >>> float(kl_rows(p, p))
    0.0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(softmax(p) || softmax(q))`` from logits, computed exactly in float32.

    Shape: p_logits (N, K), q_logits (N, K) -> (N,). Gradients flow into both arguments; detach
    the one that is a fixed target.
    """
    log_p = F.log_softmax(p_logits.float(), dim=1)
    return (log_p.exp() * (log_p - F.log_softmax(q_logits.float(), dim=1))).sum(1)


__all__ = ["kl_rows"]
